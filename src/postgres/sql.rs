//! The statements, made once per call with the schema's name in them.
//!
//! ```text
//! <schema>.version  (version)                      one row: the layout's version (1)
//! <schema>.fencing  sequence                       fencing tokens, strictly increasing
//! <schema>.locks    (slot, token, expires, owner)  a row while a run holds the slot's lock;
//!                                                  expires is judged by the server's now()
//! <schema>.slots    (slot, result, failure,        the last good result (the entry format's
//!                    key_values, updated)          bytes), the last failure record (JSON),
//!                                                  the key values (JSON), the last write
//! ```
//!
//! A holder's writes are guarded by its token and an unexpired lease row in the same
//! statement: a holder whose lease passed writes nothing. The release notifies
//! `<schema>_released` with the slot as payload.
//!
//! The run slots of `--exclusive --slots N` are lock rows too: slot 0 is the NAME's
//! own (`NAME`), slot i > 0 is `NAME#i`, and the N in force is the `owner` of a row
//! `NAME#slots` that never holds anything (its `expires` is `-infinity`). `#` is in
//! no NAME, so none of these rows is taken for a NAME's. A taker serialises with the
//! NAME's other takers under a transaction-scoped advisory lock (see `slot_guard`).

/// The layout this release reads and writes.
pub const VERSION: i32 = 1;

pub struct Sql {
    pub channel: String,
    pub create: String,
    pub version: String,
    pub read_result: String,
    pub read_failure: String,
    pub lock: String,
    pub renew: String,
    pub adopt: String,
    pub save_result: String,
    pub save_failure: String,
    pub save_key_values: String,
    pub release: String,
    pub held: String,
    pub snapshot: String,
    pub slots: String,
    pub clear: String,
    pub clear_older: String,
    pub slot_guard: String,
    pub slot_rows: String,
    pub slot_count: String,
    pub slots_held: String,
}

impl Sql {
    pub fn new(schema: &str) -> Sql {
        let s = format!("\"{schema}\"");
        let channel = format!("{schema}_released");
        let live = "expires > now()";
        Sql {
            create: format!(
                "BEGIN;
                 SELECT pg_advisory_xact_lock(hashtext('singleflight schema {schema}'));
                 CREATE SCHEMA IF NOT EXISTS {s};
                 CREATE TABLE IF NOT EXISTS {s}.version (version integer NOT NULL);
                 INSERT INTO {s}.version SELECT {VERSION} WHERE NOT EXISTS (SELECT FROM {s}.version);
                 CREATE SEQUENCE IF NOT EXISTS {s}.fencing;
                 CREATE TABLE IF NOT EXISTS {s}.locks (slot text PRIMARY KEY, token bigint NOT NULL,
                     expires timestamptz NOT NULL, owner text NOT NULL);
                 CREATE TABLE IF NOT EXISTS {s}.slots (slot text PRIMARY KEY, result bytea,
                     failure bytea, key_values bytea, updated timestamptz NOT NULL DEFAULT now());
                 COMMIT;"
            ),
            version: format!("SELECT max(version) FROM {s}.version"),
            read_result: format!("SELECT result FROM {s}.slots WHERE slot = $1"),
            read_failure: format!("SELECT failure FROM {s}.slots WHERE slot = $1"),
            lock: format!(
                "INSERT INTO {s}.locks AS l (slot, token, expires, owner)
                 VALUES ($1, nextval('{s}.fencing'), now() + $2 * interval '1 second', $3)
                 ON CONFLICT (slot) DO UPDATE SET token = excluded.token,
                     expires = excluded.expires, owner = excluded.owner
                 WHERE l.expires <= now()
                 RETURNING token"
            ),
            renew: format!(
                "UPDATE {s}.locks SET expires = now() + $3 * interval '1 second'
                 WHERE slot = $1 AND token = $2 AND {live} RETURNING 1"
            ),
            adopt: format!(
                "UPDATE {s}.locks SET expires = now() + $3 * interval '1 second', owner = $4
                 WHERE slot = $1 AND token = $2 AND {live} RETURNING 1"
            ),
            save_result: format!(
                "WITH held AS (DELETE FROM {s}.locks WHERE slot = $1 AND token = $2 AND {live}
                               RETURNING slot),
                 put AS (INSERT INTO {s}.slots AS t (slot, result, updated)
                         SELECT slot, $3, now() FROM held
                         ON CONFLICT (slot) DO UPDATE SET result = excluded.result,
                             updated = excluded.updated,
                             failure = CASE WHEN $4 THEN NULL ELSE t.failure END)
                 SELECT pg_notify('{channel}', slot) FROM held"
            ),
            save_failure: Sql::guarded_put(&s, "failure"),
            save_key_values: Sql::guarded_put(&s, "key_values"),
            release: format!(
                "WITH held AS (DELETE FROM {s}.locks WHERE slot = $1 AND token = $2 RETURNING slot),
                 f AS (UPDATE {s}.slots SET failure = NULL
                       WHERE $3 AND slot IN (SELECT slot FROM held))
                 SELECT pg_notify('{channel}', slot) FROM held"
            ),
            held: format!(
                "SELECT extract(epoch FROM expires - now())::float8, pg_notify($2, $3)::text,
                        pg_backend_pid()
                 FROM (SELECT 1) one LEFT JOIN {s}.locks ON slot = $1 AND {live}"
            ),
            snapshot: format!(
                "SELECT t.result, t.failure, t.key_values, l.owner
                 FROM (SELECT $1::text AS slot) k
                 LEFT JOIN {s}.slots t ON t.slot = k.slot
                 LEFT JOIN {s}.locks l ON l.slot = k.slot AND l.{live}"
            ),
            slots: format!(
                "SELECT slot FROM {s}.slots UNION SELECT slot FROM {s}.locks WHERE {live}
                 ORDER BY 1"
            ),
            clear: format!(
                "WITH held AS (DELETE FROM {s}.locks WHERE slot = $1 AND token = $2 AND {live}
                               RETURNING slot),
                 gone AS (DELETE FROM {s}.slots t USING held WHERE t.slot = held.slot
                          RETURNING t.result IS NOT NULL AS r, t.failure IS NOT NULL AS f,
                                    t.key_values IS NOT NULL AS k)
                 SELECT (SELECT count(*) FROM held), (SELECT r FROM gone), (SELECT f FROM gone),
                        (SELECT k FROM gone),
                        (SELECT count(pg_notify('{channel}', slot)::text) FROM held)"
            ),
            clear_older: format!(
                "DELETE FROM {s}.slots WHERE slot = $1 AND updated <= now() - $2 * interval '1 second'
                     AND NOT EXISTS (SELECT FROM {s}.locks WHERE slot = $1 AND {live})
                 RETURNING result IS NOT NULL, failure IS NOT NULL, key_values IS NOT NULL"
            ),
            slot_guard: format!("SELECT pg_advisory_xact_lock(hashtext('singleflight slots {schema} ' || $1))::text"),
            slot_rows: format!(
                "SELECT slot, owner FROM {s}.locks
                 WHERE (slot = $1 AND {live})
                    OR (left(slot, length($1) + 1) = $1 || '#' AND ({live} OR slot = $1 || '#slots'))"
            ),
            slot_count: format!(
                "INSERT INTO {s}.locks (slot, token, expires, owner)
                 VALUES ($1 || '#slots', 0, '-infinity', $2)
                 ON CONFLICT (slot) DO UPDATE SET owner = excluded.owner"
            ),
            slots_held: format!(
                "SELECT extract(epoch FROM min(expires) - now())::float8, pg_notify($2, $3)::text,
                        pg_backend_pid(), count(*)
                 FROM {s}.locks
                 WHERE (slot = $1 OR left(slot, length($1) + 1) = $1 || '#') AND {live}"
            ),
            channel,
        }
    }

    /// Writes one column of a slot if the lock is still held with this token.
    fn guarded_put(s: &str, column: &str) -> String {
        format!(
            "WITH held AS (SELECT slot FROM {s}.locks
                           WHERE slot = $1 AND token = $2 AND expires > now() FOR UPDATE)
             INSERT INTO {s}.slots AS t (slot, {column}, updated) SELECT slot, $3, now() FROM held
             ON CONFLICT (slot) DO UPDATE SET {column} = excluded.{column}, updated = excluded.updated
             RETURNING 1"
        )
    }
}
