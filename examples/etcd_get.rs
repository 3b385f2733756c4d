//! One `get` through singleflight's etcd client, the value written to stdout: the
//! backend's share of a fresh hit, to time against `etcdctl get` of the same key.
//!
//!     etcd_get etcd://HOST:PORT KEY          one get, as a process (for hyperfine)
//!     etcd_get etcd://HOST:PORT KEY N        N gets in one process: latency figures

use std::io::Write;
use std::time::{Duration, Instant};

use singleflight::etcd_client::{Client, DEFAULT_TIMEOUT, Endpoints};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, key, rest @ ..] = args.as_slice() else {
        return Err("usage: etcd_get etcd://HOST:PORT KEY [N]".into());
    };
    let client = Client::new(Endpoints::parse(url)?, DEFAULT_TIMEOUT);
    let count: usize = rest.first().map_or(Ok(1), |n| n.parse())?;
    if count == 1 {
        let value = client.get(key.as_bytes())?.ok_or("no such key")?;
        std::io::stdout().write_all(&value.bytes)?;
        return Ok(());
    }
    let mut times: Vec<Duration> = (0..count)
        .map(|_| {
            let start = Instant::now();
            client.get(key.as_bytes()).map(|_| start.elapsed())
        })
        .collect::<Result<_, _>>()?;
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    println!(
        "{count} gets on one connection: min {:?}, median {:?}, p90 {:?}, p99 {:?}",
        at(0.0),
        at(0.5),
        at(0.9),
        at(0.99)
    );
    Ok(())
}
