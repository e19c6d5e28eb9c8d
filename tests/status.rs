//! The status page (contract section 5, `GET /status`), over real HTTP on loopback with real
//! RS256 tokens: where it is served, what it shows (a down server, the last decisions, an alarm,
//! the config hash and audit head), and what it must never show (credentials, keys, tokens,
//! unescaped text from the node).

mod common;

use std::sync::Arc;

use common::downstream::{Answer, Downstream, Script};
use common::events::{event_body, post_event, tss_event, EventPeer};
use common::gateway::{config_yaml, entry, entry_at, free_port, Gateway};
use common::http::http;
use common::keys::keys;
use common::node::{post_body, send};
use common::requests::request;
use common::tokens::contains_jwt;
use common::until;
use tokio::net::TcpListener;

const SECRET: &str = "s3cret-status";

/// Rejects any request whose id says so, approves the rest.
fn rejects_marked() -> Script {
    Arc::new(|seen| {
        if seen.request_id.contains("reject") {
            Answer::reject("limit <b>exceeded</b>")
        } else {
            Answer::approve()
        }
    })
}

/// GETs `/status` at `addr`: the HTTP status, the headers and the page.
async fn status_page(addr: std::net::SocketAddr) -> (u16, reqwest::header::HeaderMap, String) {
    let resp = http()
        .get(format!("http://{addr}/status"))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.text().await.unwrap())
}

/// The table row of the server named `name` (from its `data-server` to the row's end).
fn row<'a>(page: &'a str, table: &str, name: &str) -> &'a str {
    let table_at = page
        .find(&format!("id=\"{table}\""))
        .unwrap_or_else(|| panic!("no table {table}"));
    let page = &page[table_at..];
    let at = page
        .find(&format!("data-server=\"{name}\""))
        .unwrap_or_else(|| panic!("no row for {name} in {table}"));
    let end = page[at..].find("</tr>").unwrap() + at;
    &page[at..end]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_servers_decisions_alarms_and_no_secret() {
    let k = keys();
    let risk = Downstream::start("risk", &k.servers[0], rejects_marked(), 0).await;
    let gone = Downstream::start("gone", &k.servers[1], rejects_marked(), 0).await;
    let watcher = Downstream::start("watcher", &k.servers[2], rejects_marked(), 0).await;
    let siem = EventPeer::start("siem").await;
    let risk_url = format!("http://user:{SECRET}@{}/v2/check", risk.addr);
    let gone_url = format!("http://127.0.0.1:{}/v2/check", free_port());
    let siem_url = siem
        .url()
        .replace("http://", &format!("http://ops:{SECRET}@"));
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let extra = format!(
        "admin_listen: {admin_addr}\nhealth_check_interval_ms: 100\naudit_log: audit.jsonl\n\
         tss_node_event_public_key: {}\nevent_servers:\n  - name: siem\n    service_address: {siem_url}\n    timeout_ms: 2000\n",
        k.node_event.spki.display()
    );
    let gw = Gateway::start(
        &[
            entry_at(&risk, &risk_url, ""),
            entry_at(&gone, &gone_url, "retries: 0"),
            entry(&watcher, "mode: shadow\nrequest_types: [key_sign]"),
        ],
        &extra,
    )
    .await;
    tokio::spawn(tss_callback_gateway::inbound::listener::serve_admin(
        admin,
        gw.shared.clone(),
        std::future::pending(),
    ));

    // Only on admin_listen.
    let (status, _, _) = status_page(gw.addr).await;
    assert_eq!(status, 404, "/status on the node's listener");

    // `gone` is enforcing and down: every request fails (status 30) naming it; the marked one
    // is rejected by `risk` at once.
    let script_id = "<script>alert('reject')</script>";
    send(&gw.url(), &request("key_sign", script_id))
        .await
        .expect(0, "REJECT", &["risk"]);
    send(&gw.url(), &request("key_sign", "plain-1"))
        .await
        .expect(30, "REJECT", &["gone"]);
    // Executed without approval: an alarm.
    let succeeded = tss_event("ev-alarm", "request.keysign.succeeded", "never-approved");
    assert_eq!(post_event(gw.addr, event_body(&succeeded)).await.0, 200);
    until(10, "the event delivered", || siem.count("ev-alarm") == 1).await;
    let checked = || {
        let h = gw.shared.metrics.render();
        h.contains(r#"tss_gateway_downstream_up{mode="enforce",server="gone"} 0"#)
            && h.contains(r#"tss_gateway_downstream_up{mode="enforce",server="risk"} 1"#)
    };
    until(10, "health checked", checked).await;

    let (status, headers, page) = status_page(admin_addr).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(!csp.contains("script-src"), "{csp}");

    // Nothing secret.
    assert!(!page.contains(SECRET), "a credential on the page");
    assert!(!page.contains("BEGIN"), "a PEM on the page");
    assert!(
        !page.contains("eyJ") && !contains_jwt(&page),
        "a token on the page"
    );
    assert!(
        page.contains("http://***@127.0.0.1"),
        "the redacted address"
    );
    // The node's text is text.
    assert!(!page.contains("<script>"), "unescaped request_id");
    assert!(!page.contains("<b>"), "unescaped downstream error");
    assert!(
        page.contains("&lt;script&gt;alert('reject')&lt;/script&gt;")
            || page.contains("&lt;script&gt;alert(&#39;reject&#39;)&lt;/script&gt;")
    );
    assert!(page.contains("limit &lt;b&gt;exceeded&lt;/b&gt;"));

    // Servers: modes, types, health.
    let gone_row = row(&page, "servers", "gone");
    assert!(gone_row.contains(r#"data-health="down""#), "{gone_row}");
    assert!(gone_row.contains("transport_error"), "{gone_row}");
    let risk_row = row(&page, "servers", "risk");
    assert!(risk_row.contains(r#"data-health="up""#), "{risk_row}");
    assert!(
        risk_row.contains("enforce") && risk_row.contains("rejected"),
        "{risk_row}"
    );
    let watcher_row = row(&page, "servers", "watcher");
    assert!(
        watcher_row.contains("shadow") && watcher_row.contains("key_sign"),
        "{watcher_row}"
    );
    let siem_row = row(&page, "event-servers", "siem");
    assert!(siem_row.contains("delivered"), "{siem_row}");

    // Decisions, newest first; the alarm; config and audit head.
    let decisions = &page[page.find(r#"id="decisions""#).unwrap()..];
    let plain = decisions.find("plain-1").unwrap();
    let script = decisions.find("&lt;script&gt;").unwrap();
    assert!(plain < script, "newest first");
    assert!(decisions.contains("REJECT"));
    let alarms = &page[page.find(r#"id="alarms""#).unwrap()..];
    assert!(
        alarms.starts_with(r#"id="alarms"><h2>ALARM"#) || alarms.contains("ALARM"),
        "{alarms}"
    );
    assert!(alarms.contains("never-approved") && alarms.contains("ev-alarm"));
    let config = std::fs::read(&gw.config_path).unwrap();
    let sha = common::sha256_hex(&config);
    assert!(page.contains(&format!(r#"<code id="config-sha256">{sha}</code>"#)));
    let audited = std::fs::read_to_string(gw.dir.path().join("audit.jsonl")).unwrap();
    assert!(
        audited.contains(&format!(r#""sha256":"{sha}""#)),
        "same hash as the audit record"
    );
    assert!(page.contains(r#"<dd id="generation">1</dd>"#));
    let seq = &page[page.find(r#"id="audit-seq">"#).unwrap() + 15..];
    let seq: String = seq.chars().take_while(|c| c.is_ascii_digit()).collect();
    assert!(seq.parse::<u64>().unwrap() >= 1, "the audit head seq");
    assert!(page.contains(r#"<meta http-equiv="refresh" content="5">"#));
    assert!(page.contains(r#"id="readiness">ready<"#));

    // Anyone who reaches the listener can send junk: it is listed apart and cannot push the
    // node's decisions off the page.
    for i in 0..120 {
        let reply = post_body(&gw.url(), format!("TSS_JWT_MSG=junk-{i}").into_bytes()).await;
        assert_eq!(reply.response.status, 20);
    }
    let (_, _, page) = status_page(admin_addr).await;
    let decisions =
        &page[page.find(r#"id="decisions""#).unwrap()..page.find(r#"id="refused""#).unwrap()];
    assert!(
        decisions.contains("plain-1") && decisions.contains("&lt;script&gt;"),
        "{decisions}"
    );
    assert!(
        !decisions.contains("invalid token"),
        "junk among the decisions"
    );
    assert!(
        page.contains("120 request(s) refused since start-up"),
        "the refusals counted"
    );
    let refused = &page[page.find(r#"id="refused""#).unwrap()..];
    assert_eq!(
        refused.matches("<tr>").count(),
        1 + 10,
        "header + the last 10 refusals"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_admin_listen_the_page_is_on_listen_and_removed_servers_disappear() {
    let k = keys();
    let a = Downstream::start("alpha", &k.servers[0], rejects_marked(), 0).await;
    let b = Downstream::start("beta", &k.servers[1], rejects_marked(), 0).await;
    let gw = Gateway::start(&[entry(&a, ""), entry(&b, "")], "").await;
    send(&gw.url(), &request("key_sign", "first"))
        .await
        .expect(0, "APPROVE", &[]);
    let (status, _, page) = status_page(gw.addr).await;
    assert_eq!(status, 200);
    assert!(row(&page, "servers", "beta").contains("approved"));
    assert!(
        row(&page, "servers", "beta").contains(r#"data-health="unknown""#),
        "health checks off"
    );

    gw.reload_with(&config_yaml(gw.addr, &[entry(&a, "")], ""));
    let (_, _, page) = status_page(gw.addr).await;
    assert!(
        !page.contains(r#"data-server="beta""#),
        "a removed server disappears"
    );
    assert!(page.contains(r#"data-server="alpha""#));
    assert!(page.contains(r#"<dd id="generation">2</dd>"#));
    assert!(page.contains("No alarms in the last 24 h."));
    assert!(page.contains("first"));
}
