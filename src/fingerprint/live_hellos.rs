//! One record per distinct ClientHello among the live HTTP/1 client
//! connections.
//!
//! A fleet's connections come from a few client builds, and
//! [`ClientHello::fresh_and_anonymous`] makes every connection of one build
//! record the same hello (no host name, GREASE and extension order
//! normalised). Everything a TLS connection's [`ClientConnection`] holds
//! follows from its hello, except the HTTP/2 preface: the presentation made
//! at its first request, and the recording last found equal. Kept per
//! connection, the hello's lists and these were about 1 KB of every idle
//! tunnel, the most after rustls' own buffers, and the presentation was
//! allocated amid a request's short-lived buffers, where it kept a page of
//! them from being returned. HTTP/1 connections whose hellos are equal now
//! share one record; an HTTP/2 connection takes its own copy when its ALPN
//! is known ([`ClientConnection::for_h2`]), since its preface is its own.
//!
//! The table holds weak references, so a record lives as long as a
//! connection uses it. Entries no connection holds any more are swept
//! whenever the table has doubled since the last sweep, which bounds it to
//! twice the distinct hellos that were live then (plus a small floor),
//! whatever hellos clients send.

use std::hash::BuildHasher as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use super::client_hello::ClientHello;
use super::ClientConnection;

/// Below this many entries the table is never swept.
const SWEEP_FLOOR: usize = 64;

/// The records of live TLS client connections, one per distinct hello.
#[derive(Debug, Default)]
pub struct LiveHellos {
    /// By a seeded hash of the hello. Two different hellos with one hash do
    /// not share: the second keeps its own record (see [`LiveHellos::share`]).
    by_hash: DashMap<u64, Weak<ClientConnection>>,
    /// Seeded per process, so clients cannot aim hellos at one entry.
    hasher: foldhash::fast::RandomState,
    /// The table's length after the last sweep.
    swept_len: AtomicUsize,
}

impl LiveHellos {
    /// The record of a connection that sent `hello` (already fresh and
    /// anonymous): the one live connections with an equal hello hold, else
    /// a new one that later equal hellos will share.
    pub fn share(&self, hello: ClientHello) -> Arc<ClientConnection> {
        let key = self.hasher.hash_one(&hello);
        let record = |hello| Arc::new(ClientConnection::with_hello(Arc::new(hello)));
        let shared = match self.by_hash.entry(key) {
            Entry::Occupied(mut entry) => match entry.get().upgrade() {
                Some(live) if live.hello.as_deref() == Some(&hello) => return live,
                // A different hello under the same hash keeps its own record
                // (rare, and only costs memory).
                Some(_) => return record(hello),
                None => {
                    let shared = record(hello);
                    entry.insert(Arc::downgrade(&shared));
                    return shared;
                }
            },
            Entry::Vacant(entry) => {
                let shared = record(hello);
                entry.insert(Arc::downgrade(&shared));
                shared
            }
        };
        // After the entry's shard lock is released: the sweep takes them all.
        self.sweep_if_doubled();
        shared
    }

    fn sweep_if_doubled(&self) {
        let len = self.by_hash.len();
        let swept = self.swept_len.load(Ordering::Relaxed);
        if len < SWEEP_FLOOR.max(swept.saturating_mul(2)) {
            return;
        }
        self.by_hash.retain(|_, record| record.strong_count() > 0);
        self.swept_len.store(self.by_hash.len(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::profile;

    fn chrome() -> ClientHello {
        let Some(chrome) = profile::chrome_hello() else {
            panic!("the built-in Chrome hello parses");
        };
        (*chrome).clone()
    }

    fn hello_of(record: &ClientConnection) -> &ClientHello {
        let Some(hello) = record.hello.as_deref() else {
            panic!("a TLS connection's record has its hello");
        };
        hello
    }

    #[test]
    fn equal_hellos_share_one_record_and_different_ones_do_not() {
        let live = LiveHellos::default();
        let first = live.share(chrome());
        let second = live.share(chrome());
        assert!(Arc::ptr_eq(&first, &second));
        assert!(Arc::ptr_eq(&first.presented(), &second.presented()));

        let mut other = chrome();
        other.cipher_suites.reverse();
        let third = live.share(other.clone());
        assert!(!Arc::ptr_eq(&first, &third));
        assert_eq!(*hello_of(&third), other);
        assert_ne!(first.key(), third.key());
        assert_eq!(live.by_hash.len(), 2);
    }

    #[test]
    fn an_h2_connection_takes_its_own_record() {
        let live = LiveHellos::default();
        let h1 = live.share(chrome());
        let h2 = h1.for_h2();
        assert!(std::ptr::eq(hello_of(&h1), hello_of(&h2)));
        let preface = Arc::new(crate::fingerprint::h2_preface::H2Fingerprint::default());
        assert!(h2.preface.set(preface).is_ok());
        assert!(h1.h2().is_none(), "the shared record got a preface");
        assert!(Arc::ptr_eq(&live.share(chrome()), &h1));
    }

    #[test]
    fn a_hello_no_connection_holds_is_made_anew() {
        let live = LiveHellos::default();
        let first = live.share(chrome());
        let weak = Arc::downgrade(&first);
        drop(first);
        assert!(weak.upgrade().is_none());
        let again = live.share(chrome());
        assert_eq!(*hello_of(&again), chrome());
        assert_eq!(live.by_hash.len(), 1);
    }

    #[test]
    fn the_table_stays_bounded_by_live_hellos() {
        let live = LiveHellos::default();
        let mut held = Vec::new();
        // 1,000 distinct hellos, one in ten still held by a connection.
        for n in 0..1_000u16 {
            let mut hello = chrome();
            hello.cipher_suites.push(n);
            let shared = live.share(hello);
            if n % 10 == 0 {
                held.push(shared);
            }
        }
        // At most twice what was live at the last sweep, plus the floor.
        assert!(
            live.by_hash.len() <= SWEEP_FLOOR + 2 * held.len(),
            "{} entries for {} live hellos",
            live.by_hash.len(),
            held.len()
        );
        for hello in &held {
            let Some(found) = live
                .by_hash
                .get(&live.hasher.hash_one(hello_of(hello)))
                .and_then(|weak| weak.upgrade())
            else {
                panic!("a held hello was swept");
            };
            assert!(Arc::ptr_eq(&found, hello));
        }
    }
}
