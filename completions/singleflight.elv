
use builtin;
use str;

set edit:completion:arg-completer[singleflight] = {|@words|
    fn spaces {|n|
        builtin:repeat $n ' ' | str:join ''
    }
    fn cand {|text desc|
        edit:complex-candidate $text &display=$text' '(spaces (- 14 (wcswidth $text)))$desc
    }
    var command = 'singleflight'
    for word $words[1..-1] {
        if (str:has-prefix $word '-') {
            break
        }
        set command = $command';'$word
    }
    var completions = [
        &'singleflight'= {
            cand --ttl 'A result younger than this is fresh'
            cand --timeout 'Hard limit on one run of the command; 0 (or off, none) for no limit'
            cand --kill-after 'Grace between SIGTERM and SIGKILL of the command''s process tree'
            cand --wait 'How long a caller with nothing servable waits for the in-flight run [default: timeout + kill-after]'
            cand --max-stale 'The oldest result served while another run is in flight [default: unlimited]'
            cand --retry-after 'After a failed run, no new run starts for this long [default: the --ttl]'
            cand --retry-max 'Back-off that grows: each failed run in a row doubles the wait before the next run, from --retry-after up to this, with ±10% jitter; a good run resets it'
            cand --key-env 'The result belongs to this variable''s value (set and unset differ); repeatable'
            cand --key-file 'The result belongs to this file''s state: a change (write, rename over it, deletion) makes the next call a miss; repeatable'
            cand --key-stdin-json 'The result belongs to the value at this RFC 6901 JSON pointer (e.g. /session_id) in the JSON on stdin; a missing value is a key value of its own; stdin that is not JSON: exit 2, nothing runs (implies --stdin); repeatable'
            cand --slots 'With --exclusive: at most N runs of the NAME at once (a semaphore of N); the first N of callers that find every slot free holds until all have let go'
            cand --ready 'With --service: a shell command that succeeds once the instance is ready (e.g. `curl -sf localhost:8080/health`); callers return once it does, or exit 75 when --wait runs out'
            cand --start-limit 'With --service: an instance that was up (passed --ready; without one, lived 1s) and then ended is started again by the next caller at once, unless this many started within --start-window: that, or an instance that ended before it was up, is a crash loop, backed off as a failed run (--retry-after, --retry-max)'
            cand --start-window 'With --service: the window of --start-limit'
            cand --max-output 'Cap on captured stdout; past it the run is killed and fails'
            cand --lease-ttl 'How long the etcd lock outlives a singleflight that can no longer renew it (killed, cut off from etcd); renewed every third of it, the run killed when renewals failed for most of it. From 2s to 1h, whole seconds [default: 10s]'
            cand --cache-dir 'Where locks and results live [default: the platform cache dir + /singleflight]'
            cand --backend 'Keep locks and results in etcd or PostgreSQL, shared by every machine that uses it, instead of the cache dir: etcd://HOST:PORT[,HOST:PORT...] or postgres://USER@HOST:PORT/DB?sslmode=... (password from PGPASSWORD or ~/.pgpass)'
            cand --pg-schema 'The PostgreSQL schema of singleflight''s tables, created on first use [default: singleflight]'
            cand --etcd-prefix 'The etcd key prefix of singleflight''s keys [default: /singleflight/]'
            cand --backend-timeout 'How long one request to one etcd member may take; a caller that cannot reach etcd exits 125 without running the command [default: 2s]'
            cand --etcd-cacert 'Trust the etcd+https:// server certificates this CA (PEM) signed, and only those [default: Mozilla''s root certificates]'
            cand --etcd-cert 'Show etcd this client certificate (PEM), for its --client-cert-auth'
            cand --etcd-key 'The private key (PEM) of --etcd-cert'
            cand --etcd-user 'Log in to etcd as this user; the password comes from the environment variable SINGLEFLIGHT_ETCD_PASSWORD or --etcd-password-file, never from the command line'
            cand --etcd-password-file 'The --etcd-user''s password: the first line of this file'
            cand --key-cwd 'The result belongs to the current directory: each directory has its own'
            cand --stdin 'Give the command the caller''s stdin (read to its end, at most 1 MiB, before anything else) instead of /dev/null; with --background a refresh in the background gets the stdin of the caller that started it. More than 1 MiB: exit 2, nothing runs'
            cand --key-stdin 'The result belongs to the whole of stdin (implies --stdin)'
            cand --no-replay-stderr 'Do not write a served result''s stored stderr to stderr (by default a hit or a waiter writes the run''s stderr, then its stdout)'
            cand --background 'Serve a stale result at once and refresh it in one detached process'
            cand --exclusive 'Every caller runs its own command, one at a time per NAME, waiting up to --wait for its turn; nothing is cached (flock(1) with a timeout and a tree kill)'
            cand --service 'Keep one long-lived instance of the command per NAME, started detached by the caller that finds none and supervised while it lives; output goes to NAME.log in the cache dir (capped by --max-output). --timeout bounds each --ready check'
            cand --cache-failures 'A run that exits non-zero replaces the last good result'
            cand -v 'Say on stderr what was decided and why'
            cand --verbose 'Say on stderr what was decided and why'
            cand -q 'No warnings on stderr (errors still print)'
            cand --quiet 'No warnings on stderr (errors still print)'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand -V 'Print version'
            cand --version 'Print version'
            cand status 'Show each NAME''s result, age, last run and whether a run is in flight'
            cand stop 'Stop the run in flight of each NAME (a --service instance, say): TERM to the singleflight that runs it, which stops the command''s tree (TERM, then KILL after its --kill-after)'
            cand clear 'Remove results, waiting for any run in flight'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'singleflight;status'= {
            cand --cache-dir 'Where locks and results live [default: the platform cache dir + /singleflight]'
            cand --backend 'Keep locks and results in etcd or PostgreSQL, shared by every machine that uses it, instead of the cache dir: etcd://HOST:PORT[,HOST:PORT...] or postgres://USER@HOST:PORT/DB?sslmode=... (password from PGPASSWORD or ~/.pgpass)'
            cand --pg-schema 'The PostgreSQL schema of singleflight''s tables, created on first use [default: singleflight]'
            cand --etcd-prefix 'The etcd key prefix of singleflight''s keys [default: /singleflight/]'
            cand --backend-timeout 'How long one request to one etcd member may take; a caller that cannot reach etcd exits 125 without running the command [default: 2s]'
            cand --etcd-cacert 'Trust the etcd+https:// server certificates this CA (PEM) signed, and only those [default: Mozilla''s root certificates]'
            cand --etcd-cert 'Show etcd this client certificate (PEM), for its --client-cert-auth'
            cand --etcd-key 'The private key (PEM) of --etcd-cert'
            cand --etcd-user 'Log in to etcd as this user; the password comes from the environment variable SINGLEFLIGHT_ETCD_PASSWORD or --etcd-password-file, never from the command line'
            cand --etcd-password-file 'The --etcd-user''s password: the first line of this file'
            cand --json 'One JSON array with stable snake_case keys'
            cand -v 'Say on stderr what was decided and why'
            cand --verbose 'Say on stderr what was decided and why'
            cand -q 'No warnings on stderr (errors still print)'
            cand --quiet 'No warnings on stderr (errors still print)'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
        }
        &'singleflight;stop'= {
            cand --kill-after 'How long to wait for it to let go before it is killed (its guard then kills the tree)'
            cand --cache-dir 'Where locks and results live [default: the platform cache dir + /singleflight]'
            cand --backend 'Keep locks and results in etcd or PostgreSQL, shared by every machine that uses it, instead of the cache dir: etcd://HOST:PORT[,HOST:PORT...] or postgres://USER@HOST:PORT/DB?sslmode=... (password from PGPASSWORD or ~/.pgpass)'
            cand --pg-schema 'The PostgreSQL schema of singleflight''s tables, created on first use [default: singleflight]'
            cand --etcd-prefix 'The etcd key prefix of singleflight''s keys [default: /singleflight/]'
            cand --backend-timeout 'How long one request to one etcd member may take; a caller that cannot reach etcd exits 125 without running the command [default: 2s]'
            cand --etcd-cacert 'Trust the etcd+https:// server certificates this CA (PEM) signed, and only those [default: Mozilla''s root certificates]'
            cand --etcd-cert 'Show etcd this client certificate (PEM), for its --client-cert-auth'
            cand --etcd-key 'The private key (PEM) of --etcd-cert'
            cand --etcd-user 'Log in to etcd as this user; the password comes from the environment variable SINGLEFLIGHT_ETCD_PASSWORD or --etcd-password-file, never from the command line'
            cand --etcd-password-file 'The --etcd-user''s password: the first line of this file'
            cand -v 'Say on stderr what was decided and why'
            cand --verbose 'Say on stderr what was decided and why'
            cand -q 'No warnings on stderr (errors still print)'
            cand --quiet 'No warnings on stderr (errors still print)'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
        }
        &'singleflight;clear'= {
            cand --older-than 'Only NAMEs not written for this long (of every NAME, unless NAMEs are given): their results, failure records and lock files go; a NAME with a run in flight is left alone'
            cand --cache-dir 'Where locks and results live [default: the platform cache dir + /singleflight]'
            cand --backend 'Keep locks and results in etcd or PostgreSQL, shared by every machine that uses it, instead of the cache dir: etcd://HOST:PORT[,HOST:PORT...] or postgres://USER@HOST:PORT/DB?sslmode=... (password from PGPASSWORD or ~/.pgpass)'
            cand --pg-schema 'The PostgreSQL schema of singleflight''s tables, created on first use [default: singleflight]'
            cand --etcd-prefix 'The etcd key prefix of singleflight''s keys [default: /singleflight/]'
            cand --backend-timeout 'How long one request to one etcd member may take; a caller that cannot reach etcd exits 125 without running the command [default: 2s]'
            cand --etcd-cacert 'Trust the etcd+https:// server certificates this CA (PEM) signed, and only those [default: Mozilla''s root certificates]'
            cand --etcd-cert 'Show etcd this client certificate (PEM), for its --client-cert-auth'
            cand --etcd-key 'The private key (PEM) of --etcd-cert'
            cand --etcd-user 'Log in to etcd as this user; the password comes from the environment variable SINGLEFLIGHT_ETCD_PASSWORD or --etcd-password-file, never from the command line'
            cand --etcd-password-file 'The --etcd-user''s password: the first line of this file'
            cand --all 'Clear every NAME'
            cand -v 'Say on stderr what was decided and why'
            cand --verbose 'Say on stderr what was decided and why'
            cand -q 'No warnings on stderr (errors still print)'
            cand --quiet 'No warnings on stderr (errors still print)'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
        }
        &'singleflight;help'= {
            cand status 'Show each NAME''s result, age, last run and whether a run is in flight'
            cand stop 'Stop the run in flight of each NAME (a --service instance, say): TERM to the singleflight that runs it, which stops the command''s tree (TERM, then KILL after its --kill-after)'
            cand clear 'Remove results, waiting for any run in flight'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'singleflight;help;status'= {
        }
        &'singleflight;help;stop'= {
        }
        &'singleflight;help;clear'= {
        }
        &'singleflight;help;help'= {
        }
    ]
    $completions[$command]
}
