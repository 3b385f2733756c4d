# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_singleflight_global_optspecs
    string join \n ttl= timeout= kill-after= wait= max-stale= retry-after= retry-max= key-cwd key-env= key-file= stdin key-stdin key-stdin-json= no-replay-stderr background exclusive slots= service ready= start-limit= start-window= cache-failures max-output= lease-ttl= cache-dir= v/verbose q/quiet backend= pg-schema= etcd-prefix= backend-timeout= etcd-cacert= etcd-cert= etcd-key= etcd-user= etcd-password-file= h/help V/version
end

function __fish_singleflight_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_singleflight_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_singleflight_using_subcommand
    set -l cmd (__fish_singleflight_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c singleflight -n "__fish_singleflight_needs_command" -l ttl -d 'A result younger than this is fresh' -r
complete -c singleflight -n "__fish_singleflight_needs_command" -l timeout -d 'Hard limit on one run of the command; 0 (or off, none) for no limit' -r
complete -c singleflight -n "__fish_singleflight_needs_command" -l kill-after -d 'Grace between SIGTERM and SIGKILL of the command\'s process tree' -r
complete -c singleflight -n "__fish_singleflight_needs_command" -l wait -d 'How long a caller with nothing servable waits for the in-flight run [default: timeout + kill-after]' -r
complete -c singleflight -n "__fish_singleflight_needs_command" -l max-stale -d 'The oldest result served while another run is in flight [default: unlimited]' -r
complete -c singleflight -n "__fish_singleflight_needs_command" -l retry-after -d 'After a failed run, no new run starts for this long [default: the --ttl]' -r
complete -c singleflight -n "__fish_singleflight_needs_command" -l retry-max -d 'Back-off that grows: each failed run in a row doubles the wait before the next run, from --retry-after up to this, with ±10% jitter; a good run resets it' -r
complete -c singleflight -n "__fish_singleflight_needs_command" -l key-env -d 'The result belongs to this variable\'s value (set and unset differ); repeatable' -r
complete -c singleflight -n "__fish_singleflight_needs_command" -l key-file -d 'The result belongs to this file\'s state: a change (write, rename over it, deletion) makes the next call a miss; repeatable' -r -F
complete -c singleflight -n "__fish_singleflight_needs_command" -l key-stdin-json -d 'The result belongs to the value at this RFC 6901 JSON pointer (e.g. /session_id) in the JSON on stdin; a missing value is a key value of its own; stdin that is not JSON: exit 2, nothing runs (implies --stdin); repeatable' -r
complete -c singleflight -n "__fish_singleflight_needs_command" -l slots -d 'With --exclusive: at most N runs of the NAME at once (a semaphore of N); the first N of callers that find every slot free holds until all have let go' -r
complete -c singleflight -n "__fish_singleflight_needs_command" -l ready -d 'With --service: a shell command that succeeds once the instance is ready (e.g. `curl -sf localhost:8080/health`); callers return once it does, or exit 75 when --wait runs out' -r
complete -c singleflight -n "__fish_singleflight_needs_command" -l start-limit -d 'With --service: an instance that was up (passed --ready; without one, lived 1s) and then ended is started again by the next caller at once, unless this many started within --start-window: that, or an instance that ended before it was up, is a crash loop, backed off as a failed run (--retry-after, --retry-max)' -r
complete -c singleflight -n "__fish_singleflight_needs_command" -l start-window -d 'With --service: the window of --start-limit' -r
complete -c singleflight -n "__fish_singleflight_needs_command" -l max-output -d 'Cap on captured stdout; past it the run is killed and fails' -r
complete -c singleflight -n "__fish_singleflight_needs_command" -l lease-ttl -d 'How long the etcd lock outlives a singleflight that can no longer renew it (killed, cut off from etcd); renewed every third of it, the run killed when renewals failed for most of it. From 2s to 1h, whole seconds [default: 10s]' -r
complete -c singleflight -n "__fish_singleflight_needs_command" -l cache-dir -d 'Where locks and results live [default: the platform cache dir + /singleflight]' -r -F
complete -c singleflight -n "__fish_singleflight_needs_command" -l backend -d 'Keep locks and results in etcd or PostgreSQL, shared by every machine that uses it, instead of the cache dir: etcd://HOST:PORT[,HOST:PORT...] or postgres://USER@HOST:PORT/DB?sslmode=... (password from PGPASSWORD or ~/.pgpass)' -r
complete -c singleflight -n "__fish_singleflight_needs_command" -l pg-schema -d 'The PostgreSQL schema of singleflight\'s tables, created on first use [default: singleflight]' -r
complete -c singleflight -n "__fish_singleflight_needs_command" -l etcd-prefix -d 'The etcd key prefix of singleflight\'s keys [default: /singleflight/]' -r
complete -c singleflight -n "__fish_singleflight_needs_command" -l backend-timeout -d 'How long one request to one etcd member may take; a caller that cannot reach etcd exits 125 without running the command [default: 2s]' -r
complete -c singleflight -n "__fish_singleflight_needs_command" -l etcd-cacert -d 'Trust the etcd+https:// server certificates this CA (PEM) signed, and only those [default: Mozilla\'s root certificates]' -r -F
complete -c singleflight -n "__fish_singleflight_needs_command" -l etcd-cert -d 'Show etcd this client certificate (PEM), for its --client-cert-auth' -r -F
complete -c singleflight -n "__fish_singleflight_needs_command" -l etcd-key -d 'The private key (PEM) of --etcd-cert' -r -F
complete -c singleflight -n "__fish_singleflight_needs_command" -l etcd-user -d 'Log in to etcd as this user; the password comes from the environment variable SINGLEFLIGHT_ETCD_PASSWORD or --etcd-password-file, never from the command line' -r
complete -c singleflight -n "__fish_singleflight_needs_command" -l etcd-password-file -d 'The --etcd-user\'s password: the first line of this file' -r -F
complete -c singleflight -n "__fish_singleflight_needs_command" -l key-cwd -d 'The result belongs to the current directory: each directory has its own'
complete -c singleflight -n "__fish_singleflight_needs_command" -l stdin -d 'Give the command the caller\'s stdin (read to its end, at most 1 MiB, before anything else) instead of /dev/null; with --background a refresh in the background gets the stdin of the caller that started it. More than 1 MiB: exit 2, nothing runs'
complete -c singleflight -n "__fish_singleflight_needs_command" -l key-stdin -d 'The result belongs to the whole of stdin (implies --stdin)'
complete -c singleflight -n "__fish_singleflight_needs_command" -l no-replay-stderr -d 'Do not write a served result\'s stored stderr to stderr (by default a hit or a waiter writes the run\'s stderr, then its stdout)'
complete -c singleflight -n "__fish_singleflight_needs_command" -l background -d 'Serve a stale result at once and refresh it in one detached process'
complete -c singleflight -n "__fish_singleflight_needs_command" -l exclusive -d 'Every caller runs its own command, one at a time per NAME, waiting up to --wait for its turn; nothing is cached (flock(1) with a timeout and a tree kill)'
complete -c singleflight -n "__fish_singleflight_needs_command" -l service -d 'Keep one long-lived instance of the command per NAME, started detached by the caller that finds none and supervised while it lives; output goes to NAME.log in the cache dir (capped by --max-output). --timeout bounds each --ready check'
complete -c singleflight -n "__fish_singleflight_needs_command" -l cache-failures -d 'A run that exits non-zero replaces the last good result'
complete -c singleflight -n "__fish_singleflight_needs_command" -s v -l verbose -d 'Say on stderr what was decided and why'
complete -c singleflight -n "__fish_singleflight_needs_command" -s q -l quiet -d 'No warnings on stderr (errors still print)'
complete -c singleflight -n "__fish_singleflight_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c singleflight -n "__fish_singleflight_needs_command" -s V -l version -d 'Print version'
complete -c singleflight -n "__fish_singleflight_needs_command" -a "status" -d 'Show each NAME\'s result, age, last run and whether a run is in flight'
complete -c singleflight -n "__fish_singleflight_needs_command" -a "stop" -d 'Stop the run in flight of each NAME (a --service instance, say): TERM to the singleflight that runs it, which stops the command\'s tree (TERM, then KILL after its --kill-after)'
complete -c singleflight -n "__fish_singleflight_needs_command" -a "clear" -d 'Remove results, waiting for any run in flight'
complete -c singleflight -n "__fish_singleflight_needs_command" -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c singleflight -n "__fish_singleflight_using_subcommand status" -l cache-dir -d 'Where locks and results live [default: the platform cache dir + /singleflight]' -r -F
complete -c singleflight -n "__fish_singleflight_using_subcommand status" -l backend -d 'Keep locks and results in etcd or PostgreSQL, shared by every machine that uses it, instead of the cache dir: etcd://HOST:PORT[,HOST:PORT...] or postgres://USER@HOST:PORT/DB?sslmode=... (password from PGPASSWORD or ~/.pgpass)' -r
complete -c singleflight -n "__fish_singleflight_using_subcommand status" -l pg-schema -d 'The PostgreSQL schema of singleflight\'s tables, created on first use [default: singleflight]' -r
complete -c singleflight -n "__fish_singleflight_using_subcommand status" -l etcd-prefix -d 'The etcd key prefix of singleflight\'s keys [default: /singleflight/]' -r
complete -c singleflight -n "__fish_singleflight_using_subcommand status" -l backend-timeout -d 'How long one request to one etcd member may take; a caller that cannot reach etcd exits 125 without running the command [default: 2s]' -r
complete -c singleflight -n "__fish_singleflight_using_subcommand status" -l etcd-cacert -d 'Trust the etcd+https:// server certificates this CA (PEM) signed, and only those [default: Mozilla\'s root certificates]' -r -F
complete -c singleflight -n "__fish_singleflight_using_subcommand status" -l etcd-cert -d 'Show etcd this client certificate (PEM), for its --client-cert-auth' -r -F
complete -c singleflight -n "__fish_singleflight_using_subcommand status" -l etcd-key -d 'The private key (PEM) of --etcd-cert' -r -F
complete -c singleflight -n "__fish_singleflight_using_subcommand status" -l etcd-user -d 'Log in to etcd as this user; the password comes from the environment variable SINGLEFLIGHT_ETCD_PASSWORD or --etcd-password-file, never from the command line' -r
complete -c singleflight -n "__fish_singleflight_using_subcommand status" -l etcd-password-file -d 'The --etcd-user\'s password: the first line of this file' -r -F
complete -c singleflight -n "__fish_singleflight_using_subcommand status" -l json -d 'One JSON array with stable snake_case keys'
complete -c singleflight -n "__fish_singleflight_using_subcommand status" -s v -l verbose -d 'Say on stderr what was decided and why'
complete -c singleflight -n "__fish_singleflight_using_subcommand status" -s q -l quiet -d 'No warnings on stderr (errors still print)'
complete -c singleflight -n "__fish_singleflight_using_subcommand status" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c singleflight -n "__fish_singleflight_using_subcommand stop" -l kill-after -d 'How long to wait for it to let go before it is killed (its guard then kills the tree)' -r
complete -c singleflight -n "__fish_singleflight_using_subcommand stop" -l cache-dir -d 'Where locks and results live [default: the platform cache dir + /singleflight]' -r -F
complete -c singleflight -n "__fish_singleflight_using_subcommand stop" -l backend -d 'Keep locks and results in etcd or PostgreSQL, shared by every machine that uses it, instead of the cache dir: etcd://HOST:PORT[,HOST:PORT...] or postgres://USER@HOST:PORT/DB?sslmode=... (password from PGPASSWORD or ~/.pgpass)' -r
complete -c singleflight -n "__fish_singleflight_using_subcommand stop" -l pg-schema -d 'The PostgreSQL schema of singleflight\'s tables, created on first use [default: singleflight]' -r
complete -c singleflight -n "__fish_singleflight_using_subcommand stop" -l etcd-prefix -d 'The etcd key prefix of singleflight\'s keys [default: /singleflight/]' -r
complete -c singleflight -n "__fish_singleflight_using_subcommand stop" -l backend-timeout -d 'How long one request to one etcd member may take; a caller that cannot reach etcd exits 125 without running the command [default: 2s]' -r
complete -c singleflight -n "__fish_singleflight_using_subcommand stop" -l etcd-cacert -d 'Trust the etcd+https:// server certificates this CA (PEM) signed, and only those [default: Mozilla\'s root certificates]' -r -F
complete -c singleflight -n "__fish_singleflight_using_subcommand stop" -l etcd-cert -d 'Show etcd this client certificate (PEM), for its --client-cert-auth' -r -F
complete -c singleflight -n "__fish_singleflight_using_subcommand stop" -l etcd-key -d 'The private key (PEM) of --etcd-cert' -r -F
complete -c singleflight -n "__fish_singleflight_using_subcommand stop" -l etcd-user -d 'Log in to etcd as this user; the password comes from the environment variable SINGLEFLIGHT_ETCD_PASSWORD or --etcd-password-file, never from the command line' -r
complete -c singleflight -n "__fish_singleflight_using_subcommand stop" -l etcd-password-file -d 'The --etcd-user\'s password: the first line of this file' -r -F
complete -c singleflight -n "__fish_singleflight_using_subcommand stop" -s v -l verbose -d 'Say on stderr what was decided and why'
complete -c singleflight -n "__fish_singleflight_using_subcommand stop" -s q -l quiet -d 'No warnings on stderr (errors still print)'
complete -c singleflight -n "__fish_singleflight_using_subcommand stop" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c singleflight -n "__fish_singleflight_using_subcommand clear" -l older-than -d 'Only NAMEs not written for this long (of every NAME, unless NAMEs are given): their results, failure records and lock files go; a NAME with a run in flight is left alone' -r
complete -c singleflight -n "__fish_singleflight_using_subcommand clear" -l cache-dir -d 'Where locks and results live [default: the platform cache dir + /singleflight]' -r -F
complete -c singleflight -n "__fish_singleflight_using_subcommand clear" -l backend -d 'Keep locks and results in etcd or PostgreSQL, shared by every machine that uses it, instead of the cache dir: etcd://HOST:PORT[,HOST:PORT...] or postgres://USER@HOST:PORT/DB?sslmode=... (password from PGPASSWORD or ~/.pgpass)' -r
complete -c singleflight -n "__fish_singleflight_using_subcommand clear" -l pg-schema -d 'The PostgreSQL schema of singleflight\'s tables, created on first use [default: singleflight]' -r
complete -c singleflight -n "__fish_singleflight_using_subcommand clear" -l etcd-prefix -d 'The etcd key prefix of singleflight\'s keys [default: /singleflight/]' -r
complete -c singleflight -n "__fish_singleflight_using_subcommand clear" -l backend-timeout -d 'How long one request to one etcd member may take; a caller that cannot reach etcd exits 125 without running the command [default: 2s]' -r
complete -c singleflight -n "__fish_singleflight_using_subcommand clear" -l etcd-cacert -d 'Trust the etcd+https:// server certificates this CA (PEM) signed, and only those [default: Mozilla\'s root certificates]' -r -F
complete -c singleflight -n "__fish_singleflight_using_subcommand clear" -l etcd-cert -d 'Show etcd this client certificate (PEM), for its --client-cert-auth' -r -F
complete -c singleflight -n "__fish_singleflight_using_subcommand clear" -l etcd-key -d 'The private key (PEM) of --etcd-cert' -r -F
complete -c singleflight -n "__fish_singleflight_using_subcommand clear" -l etcd-user -d 'Log in to etcd as this user; the password comes from the environment variable SINGLEFLIGHT_ETCD_PASSWORD or --etcd-password-file, never from the command line' -r
complete -c singleflight -n "__fish_singleflight_using_subcommand clear" -l etcd-password-file -d 'The --etcd-user\'s password: the first line of this file' -r -F
complete -c singleflight -n "__fish_singleflight_using_subcommand clear" -l all -d 'Clear every NAME'
complete -c singleflight -n "__fish_singleflight_using_subcommand clear" -s v -l verbose -d 'Say on stderr what was decided and why'
complete -c singleflight -n "__fish_singleflight_using_subcommand clear" -s q -l quiet -d 'No warnings on stderr (errors still print)'
complete -c singleflight -n "__fish_singleflight_using_subcommand clear" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c singleflight -n "__fish_singleflight_using_subcommand help; and not __fish_seen_subcommand_from status stop clear help" -f -a "status" -d 'Show each NAME\'s result, age, last run and whether a run is in flight'
complete -c singleflight -n "__fish_singleflight_using_subcommand help; and not __fish_seen_subcommand_from status stop clear help" -f -a "stop" -d 'Stop the run in flight of each NAME (a --service instance, say): TERM to the singleflight that runs it, which stops the command\'s tree (TERM, then KILL after its --kill-after)'
complete -c singleflight -n "__fish_singleflight_using_subcommand help; and not __fish_seen_subcommand_from status stop clear help" -f -a "clear" -d 'Remove results, waiting for any run in flight'
complete -c singleflight -n "__fish_singleflight_using_subcommand help; and not __fish_seen_subcommand_from status stop clear help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
