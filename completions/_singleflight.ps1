
using namespace System.Management.Automation
using namespace System.Management.Automation.Language

Register-ArgumentCompleter -Native -CommandName 'singleflight' -ScriptBlock {
    param($wordToComplete, $commandAst, $cursorPosition)

    $commandElements = $commandAst.CommandElements
    $command = @(
        'singleflight'
        for ($i = 1; $i -lt $commandElements.Count; $i++) {
            $element = $commandElements[$i]
            if ($element -isnot [StringConstantExpressionAst] -or
                $element.StringConstantType -ne [StringConstantType]::BareWord -or
                $element.Value.StartsWith('-') -or
                $element.Value -eq $wordToComplete) {
                break
        }
        $element.Value
    }) -join ';'

    $completions = @(switch ($command) {
        'singleflight' {
            [CompletionResult]::new('--ttl', '--ttl', [CompletionResultType]::ParameterName, 'A result younger than this is fresh')
            [CompletionResult]::new('--timeout', '--timeout', [CompletionResultType]::ParameterName, 'Hard limit on one run of the command; 0 (or off, none) for no limit')
            [CompletionResult]::new('--kill-after', '--kill-after', [CompletionResultType]::ParameterName, 'Grace between SIGTERM and SIGKILL of the command''s process tree')
            [CompletionResult]::new('--wait', '--wait', [CompletionResultType]::ParameterName, 'How long a caller with nothing servable waits for the in-flight run [default: timeout + kill-after]')
            [CompletionResult]::new('--max-stale', '--max-stale', [CompletionResultType]::ParameterName, 'The oldest result served while another run is in flight [default: unlimited]')
            [CompletionResult]::new('--retry-after', '--retry-after', [CompletionResultType]::ParameterName, 'After a failed run, no new run starts for this long [default: the --ttl]')
            [CompletionResult]::new('--retry-max', '--retry-max', [CompletionResultType]::ParameterName, 'Back-off that grows: each failed run in a row doubles the wait before the next run, from --retry-after up to this, with ±10% jitter; a good run resets it')
            [CompletionResult]::new('--key-env', '--key-env', [CompletionResultType]::ParameterName, 'The result belongs to this variable''s value (set and unset differ); repeatable')
            [CompletionResult]::new('--key-file', '--key-file', [CompletionResultType]::ParameterName, 'The result belongs to this file''s state: a change (write, rename over it, deletion) makes the next call a miss; repeatable')
            [CompletionResult]::new('--key-stdin-json', '--key-stdin-json', [CompletionResultType]::ParameterName, 'The result belongs to the value at this RFC 6901 JSON pointer (e.g. /session_id) in the JSON on stdin; a missing value is a key value of its own; stdin that is not JSON: exit 2, nothing runs (implies --stdin); repeatable')
            [CompletionResult]::new('--slots', '--slots', [CompletionResultType]::ParameterName, 'With --exclusive: at most N runs of the NAME at once (a semaphore of N); the first N of callers that find every slot free holds until all have let go')
            [CompletionResult]::new('--ready', '--ready', [CompletionResultType]::ParameterName, 'With --service: a shell command that succeeds once the instance is ready (e.g. `curl -sf localhost:8080/health`); callers return once it does, or exit 75 when --wait runs out')
            [CompletionResult]::new('--start-limit', '--start-limit', [CompletionResultType]::ParameterName, 'With --service: an instance that was up (passed --ready; without one, lived 1s) and then ended is started again by the next caller at once, unless this many started within --start-window: that, or an instance that ended before it was up, is a crash loop, backed off as a failed run (--retry-after, --retry-max)')
            [CompletionResult]::new('--start-window', '--start-window', [CompletionResultType]::ParameterName, 'With --service: the window of --start-limit')
            [CompletionResult]::new('--max-output', '--max-output', [CompletionResultType]::ParameterName, 'Cap on captured stdout; past it the run is killed and fails')
            [CompletionResult]::new('--lease-ttl', '--lease-ttl', [CompletionResultType]::ParameterName, 'How long the etcd lock outlives a singleflight that can no longer renew it (killed, cut off from etcd); renewed every third of it, the run killed when renewals failed for most of it. From 2s to 1h, whole seconds [default: 10s]')
            [CompletionResult]::new('--cache-dir', '--cache-dir', [CompletionResultType]::ParameterName, 'Where locks and results live [default: the platform cache dir + /singleflight]')
            [CompletionResult]::new('--backend', '--backend', [CompletionResultType]::ParameterName, 'Keep locks and results in etcd or PostgreSQL, shared by every machine that uses it, instead of the cache dir: etcd://HOST:PORT[,HOST:PORT...] or postgres://USER@HOST:PORT/DB?sslmode=... (password from PGPASSWORD or ~/.pgpass)')
            [CompletionResult]::new('--pg-schema', '--pg-schema', [CompletionResultType]::ParameterName, 'The PostgreSQL schema of singleflight''s tables, created on first use [default: singleflight]')
            [CompletionResult]::new('--etcd-prefix', '--etcd-prefix', [CompletionResultType]::ParameterName, 'The etcd key prefix of singleflight''s keys [default: /singleflight/]')
            [CompletionResult]::new('--backend-timeout', '--backend-timeout', [CompletionResultType]::ParameterName, 'How long one request to one etcd member may take; a caller that cannot reach etcd exits 125 without running the command [default: 2s]')
            [CompletionResult]::new('--etcd-cacert', '--etcd-cacert', [CompletionResultType]::ParameterName, 'Trust the etcd+https:// server certificates this CA (PEM) signed, and only those [default: Mozilla''s root certificates]')
            [CompletionResult]::new('--etcd-cert', '--etcd-cert', [CompletionResultType]::ParameterName, 'Show etcd this client certificate (PEM), for its --client-cert-auth')
            [CompletionResult]::new('--etcd-key', '--etcd-key', [CompletionResultType]::ParameterName, 'The private key (PEM) of --etcd-cert')
            [CompletionResult]::new('--etcd-user', '--etcd-user', [CompletionResultType]::ParameterName, 'Log in to etcd as this user; the password comes from the environment variable SINGLEFLIGHT_ETCD_PASSWORD or --etcd-password-file, never from the command line')
            [CompletionResult]::new('--etcd-password-file', '--etcd-password-file', [CompletionResultType]::ParameterName, 'The --etcd-user''s password: the first line of this file')
            [CompletionResult]::new('--key-cwd', '--key-cwd', [CompletionResultType]::ParameterName, 'The result belongs to the current directory: each directory has its own')
            [CompletionResult]::new('--stdin', '--stdin', [CompletionResultType]::ParameterName, 'Give the command the caller''s stdin (read to its end, at most 1 MiB, before anything else) instead of /dev/null; with --background a refresh in the background gets the stdin of the caller that started it. More than 1 MiB: exit 2, nothing runs')
            [CompletionResult]::new('--key-stdin', '--key-stdin', [CompletionResultType]::ParameterName, 'The result belongs to the whole of stdin (implies --stdin)')
            [CompletionResult]::new('--no-replay-stderr', '--no-replay-stderr', [CompletionResultType]::ParameterName, 'Do not write a served result''s stored stderr to stderr (by default a hit or a waiter writes the run''s stderr, then its stdout)')
            [CompletionResult]::new('--background', '--background', [CompletionResultType]::ParameterName, 'Serve a stale result at once and refresh it in one detached process')
            [CompletionResult]::new('--exclusive', '--exclusive', [CompletionResultType]::ParameterName, 'Every caller runs its own command, one at a time per NAME, waiting up to --wait for its turn; nothing is cached (flock(1) with a timeout and a tree kill)')
            [CompletionResult]::new('--service', '--service', [CompletionResultType]::ParameterName, 'Keep one long-lived instance of the command per NAME, started detached by the caller that finds none and supervised while it lives; output goes to NAME.log in the cache dir (capped by --max-output). --timeout bounds each --ready check')
            [CompletionResult]::new('--cache-failures', '--cache-failures', [CompletionResultType]::ParameterName, 'A run that exits non-zero replaces the last good result')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'Say on stderr what was decided and why')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'Say on stderr what was decided and why')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'No warnings on stderr (errors still print)')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'No warnings on stderr (errors still print)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('status', 'status', [CompletionResultType]::ParameterValue, 'Show each NAME''s result, age, last run and whether a run is in flight')
            [CompletionResult]::new('stop', 'stop', [CompletionResultType]::ParameterValue, 'Stop the run in flight of each NAME (a --service instance, say): TERM to the singleflight that runs it, which stops the command''s tree (TERM, then KILL after its --kill-after)')
            [CompletionResult]::new('clear', 'clear', [CompletionResultType]::ParameterValue, 'Remove results, waiting for any run in flight')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'singleflight;status' {
            [CompletionResult]::new('--cache-dir', '--cache-dir', [CompletionResultType]::ParameterName, 'Where locks and results live [default: the platform cache dir + /singleflight]')
            [CompletionResult]::new('--backend', '--backend', [CompletionResultType]::ParameterName, 'Keep locks and results in etcd or PostgreSQL, shared by every machine that uses it, instead of the cache dir: etcd://HOST:PORT[,HOST:PORT...] or postgres://USER@HOST:PORT/DB?sslmode=... (password from PGPASSWORD or ~/.pgpass)')
            [CompletionResult]::new('--pg-schema', '--pg-schema', [CompletionResultType]::ParameterName, 'The PostgreSQL schema of singleflight''s tables, created on first use [default: singleflight]')
            [CompletionResult]::new('--etcd-prefix', '--etcd-prefix', [CompletionResultType]::ParameterName, 'The etcd key prefix of singleflight''s keys [default: /singleflight/]')
            [CompletionResult]::new('--backend-timeout', '--backend-timeout', [CompletionResultType]::ParameterName, 'How long one request to one etcd member may take; a caller that cannot reach etcd exits 125 without running the command [default: 2s]')
            [CompletionResult]::new('--etcd-cacert', '--etcd-cacert', [CompletionResultType]::ParameterName, 'Trust the etcd+https:// server certificates this CA (PEM) signed, and only those [default: Mozilla''s root certificates]')
            [CompletionResult]::new('--etcd-cert', '--etcd-cert', [CompletionResultType]::ParameterName, 'Show etcd this client certificate (PEM), for its --client-cert-auth')
            [CompletionResult]::new('--etcd-key', '--etcd-key', [CompletionResultType]::ParameterName, 'The private key (PEM) of --etcd-cert')
            [CompletionResult]::new('--etcd-user', '--etcd-user', [CompletionResultType]::ParameterName, 'Log in to etcd as this user; the password comes from the environment variable SINGLEFLIGHT_ETCD_PASSWORD or --etcd-password-file, never from the command line')
            [CompletionResult]::new('--etcd-password-file', '--etcd-password-file', [CompletionResultType]::ParameterName, 'The --etcd-user''s password: the first line of this file')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'One JSON array with stable snake_case keys')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'Say on stderr what was decided and why')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'Say on stderr what was decided and why')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'No warnings on stderr (errors still print)')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'No warnings on stderr (errors still print)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            break
        }
        'singleflight;stop' {
            [CompletionResult]::new('--kill-after', '--kill-after', [CompletionResultType]::ParameterName, 'How long to wait for it to let go before it is killed (its guard then kills the tree)')
            [CompletionResult]::new('--cache-dir', '--cache-dir', [CompletionResultType]::ParameterName, 'Where locks and results live [default: the platform cache dir + /singleflight]')
            [CompletionResult]::new('--backend', '--backend', [CompletionResultType]::ParameterName, 'Keep locks and results in etcd or PostgreSQL, shared by every machine that uses it, instead of the cache dir: etcd://HOST:PORT[,HOST:PORT...] or postgres://USER@HOST:PORT/DB?sslmode=... (password from PGPASSWORD or ~/.pgpass)')
            [CompletionResult]::new('--pg-schema', '--pg-schema', [CompletionResultType]::ParameterName, 'The PostgreSQL schema of singleflight''s tables, created on first use [default: singleflight]')
            [CompletionResult]::new('--etcd-prefix', '--etcd-prefix', [CompletionResultType]::ParameterName, 'The etcd key prefix of singleflight''s keys [default: /singleflight/]')
            [CompletionResult]::new('--backend-timeout', '--backend-timeout', [CompletionResultType]::ParameterName, 'How long one request to one etcd member may take; a caller that cannot reach etcd exits 125 without running the command [default: 2s]')
            [CompletionResult]::new('--etcd-cacert', '--etcd-cacert', [CompletionResultType]::ParameterName, 'Trust the etcd+https:// server certificates this CA (PEM) signed, and only those [default: Mozilla''s root certificates]')
            [CompletionResult]::new('--etcd-cert', '--etcd-cert', [CompletionResultType]::ParameterName, 'Show etcd this client certificate (PEM), for its --client-cert-auth')
            [CompletionResult]::new('--etcd-key', '--etcd-key', [CompletionResultType]::ParameterName, 'The private key (PEM) of --etcd-cert')
            [CompletionResult]::new('--etcd-user', '--etcd-user', [CompletionResultType]::ParameterName, 'Log in to etcd as this user; the password comes from the environment variable SINGLEFLIGHT_ETCD_PASSWORD or --etcd-password-file, never from the command line')
            [CompletionResult]::new('--etcd-password-file', '--etcd-password-file', [CompletionResultType]::ParameterName, 'The --etcd-user''s password: the first line of this file')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'Say on stderr what was decided and why')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'Say on stderr what was decided and why')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'No warnings on stderr (errors still print)')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'No warnings on stderr (errors still print)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            break
        }
        'singleflight;clear' {
            [CompletionResult]::new('--older-than', '--older-than', [CompletionResultType]::ParameterName, 'Only NAMEs not written for this long (of every NAME, unless NAMEs are given): their results, failure records and lock files go; a NAME with a run in flight is left alone')
            [CompletionResult]::new('--cache-dir', '--cache-dir', [CompletionResultType]::ParameterName, 'Where locks and results live [default: the platform cache dir + /singleflight]')
            [CompletionResult]::new('--backend', '--backend', [CompletionResultType]::ParameterName, 'Keep locks and results in etcd or PostgreSQL, shared by every machine that uses it, instead of the cache dir: etcd://HOST:PORT[,HOST:PORT...] or postgres://USER@HOST:PORT/DB?sslmode=... (password from PGPASSWORD or ~/.pgpass)')
            [CompletionResult]::new('--pg-schema', '--pg-schema', [CompletionResultType]::ParameterName, 'The PostgreSQL schema of singleflight''s tables, created on first use [default: singleflight]')
            [CompletionResult]::new('--etcd-prefix', '--etcd-prefix', [CompletionResultType]::ParameterName, 'The etcd key prefix of singleflight''s keys [default: /singleflight/]')
            [CompletionResult]::new('--backend-timeout', '--backend-timeout', [CompletionResultType]::ParameterName, 'How long one request to one etcd member may take; a caller that cannot reach etcd exits 125 without running the command [default: 2s]')
            [CompletionResult]::new('--etcd-cacert', '--etcd-cacert', [CompletionResultType]::ParameterName, 'Trust the etcd+https:// server certificates this CA (PEM) signed, and only those [default: Mozilla''s root certificates]')
            [CompletionResult]::new('--etcd-cert', '--etcd-cert', [CompletionResultType]::ParameterName, 'Show etcd this client certificate (PEM), for its --client-cert-auth')
            [CompletionResult]::new('--etcd-key', '--etcd-key', [CompletionResultType]::ParameterName, 'The private key (PEM) of --etcd-cert')
            [CompletionResult]::new('--etcd-user', '--etcd-user', [CompletionResultType]::ParameterName, 'Log in to etcd as this user; the password comes from the environment variable SINGLEFLIGHT_ETCD_PASSWORD or --etcd-password-file, never from the command line')
            [CompletionResult]::new('--etcd-password-file', '--etcd-password-file', [CompletionResultType]::ParameterName, 'The --etcd-user''s password: the first line of this file')
            [CompletionResult]::new('--all', '--all', [CompletionResultType]::ParameterName, 'Clear every NAME')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'Say on stderr what was decided and why')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'Say on stderr what was decided and why')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'No warnings on stderr (errors still print)')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'No warnings on stderr (errors still print)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            break
        }
        'singleflight;help' {
            [CompletionResult]::new('status', 'status', [CompletionResultType]::ParameterValue, 'Show each NAME''s result, age, last run and whether a run is in flight')
            [CompletionResult]::new('stop', 'stop', [CompletionResultType]::ParameterValue, 'Stop the run in flight of each NAME (a --service instance, say): TERM to the singleflight that runs it, which stops the command''s tree (TERM, then KILL after its --kill-after)')
            [CompletionResult]::new('clear', 'clear', [CompletionResultType]::ParameterValue, 'Remove results, waiting for any run in flight')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'singleflight;help;status' {
            break
        }
        'singleflight;help;stop' {
            break
        }
        'singleflight;help;clear' {
            break
        }
        'singleflight;help;help' {
            break
        }
    })

    $completions.Where{ $_.CompletionText -like "$wordToComplete*" } |
        Sort-Object -Property ListItemText
}
