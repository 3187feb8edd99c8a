//! `pinproxy store`: inspect, move and measure the pin store without the
//! daemon (stop it first for the embedded store).

use anyhow::Context as _;

use super::{StoreAction, StoreArgs};
use crate::daemon;
use crate::store::{bench, transfer, PinStore as _, Store};

/// Runs `pinproxy store ...`.
pub fn store(args: StoreArgs) -> anyhow::Result<()> {
    let config = args.common.load()?;
    // Multi-threaded like the daemon, so `store bench` measures what it sees.
    let runtime = super::runtime::multi_thread()?;
    runtime.block_on(async {
        let (store, hasher) = daemon::open_store_for_tools(&config).await?;
        let key_id = hasher.key_id();
        let outcome = match args.action {
            StoreAction::Stats => {
                let counts = store.count().await?;
                let deaths = store.exit_deaths().await?;
                println!("store: {}", describe(&store));
                println!("pin-hashing key id: {key_id}");
                println!("pins: {}", counts.pins);
                println!(
                    "identities: {} ({} retired)",
                    counts.identities, counts.retired
                );
                for (exit, at) in deaths {
                    println!("exit {exit} last died at {at} (unix ms)");
                }
                Ok(())
            }
            StoreAction::Export { file } => {
                let moved = match file {
                    // Whole or not at all, and its owner's alone: it holds
                    // every pin's hash and every identity's record.
                    Some(path) => {
                        let mut replacement = crate::fsutil::Replacement::begin(&path)
                            .with_context(|| format!("cannot create {}", path.display()))?;
                        let mut out = std::io::BufWriter::new(replacement.file());
                        let moved = transfer::export(&store, &key_id, &mut out).await?;
                        std::io::Write::flush(&mut out)?;
                        drop(out);
                        replacement
                            .commit()
                            .with_context(|| format!("cannot write {}", path.display()))?;
                        moved
                    }
                    None => {
                        transfer::export(&store, &key_id, &mut std::io::stdout().lock()).await?
                    }
                };
                eprintln!(
                    "exported {} identities, {} pins",
                    moved.identities, moved.pins
                );
                Ok(())
            }
            StoreAction::Import { file } => {
                let open = || {
                    std::fs::File::open(&file)
                        .map(std::io::BufReader::new)
                        .with_context(|| format!("cannot open {}", file.display()))
                };
                // Read whole before anything is written: an export cut
                // short is refused, not imported in part.
                let now_ms = crate::clock::Clock::system().now_ms();
                let checked = transfer::check(open()?, &key_id, now_ms)?;
                if !checked.complete {
                    eprintln!(
                        "warning: {} is a format {} export, which has no end line: whether it \
                         is complete cannot be checked",
                        file.display(),
                        checked.format
                    );
                }
                if let Store::Redis(redis) = &store {
                    redis.claim_hash_key(hasher.key_bytes()).await?;
                }
                let moved = transfer::import(&store, &key_id, open()?, now_ms).await?;
                eprintln!(
                    "imported {} identities, {} pins ({} pins kept the store's existing identity)",
                    moved.identities, moved.pins, moved.conflicts
                );
                Ok::<(), anyhow::Error>(())
            }
            StoreAction::Bench { pins, concurrency } => {
                let plan = bench::Plan { pins, concurrency };
                // Its records are real: the namespace gets the key they
                // were written under, as after an import (a replica never
                // founds a key where pins were written without one).
                if let Store::Redis(redis) = &store {
                    if store.count().await?.pins == 0 {
                        redis.claim_hash_key(hasher.key_bytes()).await?;
                    }
                }
                let store = std::sync::Arc::new(store);
                let report = bench::run(store.clone(), plan).await;
                // Flushed before the numbers are printed: what was measured
                // is on disk.
                store.close().await;
                let report = report?;
                println!("{}", serde_json::to_string(&report)?);
                eprintln!(
                    "{}: {} pins at concurrency {}: {:.0} pins/s, pin-if-absent p50 {:.1} µs, p99 {:.1} µs",
                    describe(&store),
                    report.pins,
                    report.concurrency,
                    report.pins_per_sec,
                    report.p50_us,
                    report.p99_us
                );
                return Ok(());
            }
        };
        store.close().await;
        outcome
    })
}

fn describe(store: &Store) -> String {
    match store {
        Store::Memory(_) => "memory".into(),
        Store::Durable(durable) => {
            let size = std::fs::metadata(durable.path())
                .map(|m| m.len())
                .unwrap_or(0);
            format!(
                "embedded ({}, {:.1} MB)",
                durable.path().display(),
                size as f64 / 1e6
            )
        }
        Store::Redis(redis) => format!("redis ({redis:?})"),
    }
}
