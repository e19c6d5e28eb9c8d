//! Callback requests as the TSS Node sends them: the contract's samples, made distinct by
//! `request_id`.

use std::path::Path;

pub fn sample(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("config/samples/{name}.json")))
        .unwrap()
}

/// A sample with a new `request_id`, so each test request is distinct.
pub fn request(name: &str, request_id: &str) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(&sample(name)).unwrap();
    v["request_id"] = request_id.into();
    serde_json::to_vec(&v).unwrap()
}

/// A request of any `request_type` code.
pub fn request_of_type(code: i64, request_id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "request_id": request_id, "request_type": code, "request_detail": "{}", "extra_info": "{}"
    }))
    .unwrap()
}

pub fn request_id_of(payload: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
    v["request_id"].as_str().unwrap().to_owned()
}
