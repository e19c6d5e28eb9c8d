//! Shadow calls are bounded per server without waiting (issue 19 §5, issue 20 item 2): a shadow
//! server that accepts and never answers holds at most its cap of connections, beyond which a
//! shadow call is skipped and counted. Alone in its test binary: it counts this process's open
//! descriptors, which other tests running beside it would change.

mod common;

use common::downstream::{always, Answer, Downstream};
use common::gateway::{entry, Gateway};
use common::keys::keys;
use common::node::send;
use common::requests::request;

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The reproduction: `max_in_flight: 8`, a shadow server that never answers (long timeout), a
/// hundred requests. Every request is approved by the enforcing server at once; the shadow
/// server never has more than 8 calls in flight, the rest are `skipped`, and the process's
/// descriptors stay bounded (before the cap: two per request, client and server side).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_calls_beyond_the_cap_are_skipped_and_descriptors_stay_bounded() {
    const REQUESTS: usize = 100;
    const CAP: usize = 8;
    let k = keys();
    let enforcing =
        Downstream::start("enforcing", &k.servers[0], always(Answer::approve()), 0).await;
    let shadow = Downstream::start("shadow", &k.servers[1], always(Answer::hang()), 0).await;
    let gw = Gateway::start(
        &[
            entry(&enforcing, ""),
            entry(&shadow, "mode: shadow\ntimeout_ms: 30000"),
        ],
        &format!("max_in_flight: {CAP}\ndeadline_ms: 30000"),
    )
    .await;
    // Warm: the first requests open the clients' pools and the signing threads.
    send(&gw.url(), &request("key_sign", "warm"))
        .await
        .expect(0, "APPROVE", &[]);
    let before = open_descriptors();
    for i in 0..REQUESTS {
        send(&gw.url(), &request("key_sign", &format!("shadowed-{i}")))
            .await
            .expect(0, "APPROVE", &[]);
    }
    let grown = open_descriptors().saturating_sub(before);
    assert!(
        grown <= 4 * CAP + 16,
        "{grown} descriptors more after {REQUESTS} requests to a hanging shadow server"
    );
    assert!(
        shadow.calls() <= CAP,
        "{} shadow calls in flight",
        shadow.calls()
    );
    let skipped =
        gw.metric(r#"tss_gateway_downstream_requests_total{outcome="skipped",server="shadow"}"#);
    assert!(skipped >= (REQUESTS + 1 - CAP) as f64, "skipped {skipped}");
    gw.stop().await;
}
