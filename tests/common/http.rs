//! HTTP plumbing: a loopback client for the gateway's other routes, and the raw HTTP/1.1 bytes
//! that raw peers write and read.

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// GETs `url`: the HTTP status and the body as text.
pub async fn get(url: &str) -> (u16, String) {
    let resp = http().get(url).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// GETs `url` and reads the body as JSON (`/ping`, `/readyz`).
pub async fn get_json(url: &str) -> serde_json::Value {
    http().get(url).send().await.unwrap().json().await.unwrap()
}

/// For raw test peers: once `buf` holds a whole HTTP request (head and Content-Length body),
/// where its body starts and where the request ends.
pub fn complete_request(buf: &[u8]) -> Option<(usize, usize)> {
    let i = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    (buf.len() >= i + 4 + len).then_some((i + 4, i + 4 + len))
}

/// A complete HTTP/1.1 form post of `body` to `/v2/check`, on a connection kept alive.
pub fn http_post(body: &[u8]) -> Vec<u8> {
    post_with(body, "")
}

/// As [`http_post`], asking the gateway to close the connection afterwards.
pub fn http_post_closing(body: &[u8]) -> Vec<u8> {
    post_with(body, "Connection: close\r\n")
}

fn post_with(body: &[u8], headers: &str) -> Vec<u8> {
    let mut req = format!(
        "POST /v2/check HTTP/1.1\r\nHost: gw\r\nContent-Type: application/x-www-form-urlencoded\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}
