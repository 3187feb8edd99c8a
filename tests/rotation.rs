//! Rotation: exit weights shape how cookie-less requests and new identities
//! spread over the exits, and an unhealthy exit gets no new identities.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::time::Duration;

use pinproxy::exits::health::HealthState;
use support::Setup;

#[tokio::test]
async fn weights_shape_rotation_and_unhealthy_exits_get_no_new_identities() {
    let s = Setup::builder()
        .exits(3)
        .config(|c| {
            c.exits[0].weight = 3;
            c.health.retry_interval = Duration::from_secs(3600);
        })
        .start()
        .await;
    let mut counts = [0usize; 3];
    let mut conn = s.tunnel().await;
    for _ in 0..25 {
        let peer = Setup::peer(&conn.get("/", &[]).await).unwrap();
        counts[s.exit_of(peer)] += 1;
    }
    assert_eq!(counts, [15, 5, 5], "weights 3:1:1");

    // Passive failures make exit2 unhealthy; new identities avoid it.
    s.exits[1].kill();
    for _ in 0..20 {
        let _ = conn.get("/", &[]).await;
        if s.proxy.health("exit2") != HealthState::Healthy {
            break;
        }
    }
    assert_ne!(
        s.proxy.health("exit2"),
        HealthState::Healthy,
        "exit2 never became unhealthy"
    );
    for _ in 0..10 {
        let (_, peer) = s.login("/login").await;
        assert_ne!(
            s.exit_of(peer),
            1,
            "a new identity landed on an unhealthy exit"
        );
    }
    s.stop().await;
}
