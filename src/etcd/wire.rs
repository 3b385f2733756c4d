//! The JSON of etcd's v3 gateway (grpc-gateway's mapping of etcd's protobuf): bytes
//! are base64, 64-bit integers are strings, fields at their zero value are left out.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer};

use super::error::EtcdError;

pub fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// The smallest key greater than every key that starts with `prefix` (etcd's
/// `range_end` for a prefix range): the prefix with its last byte below 0xff
/// incremented. An empty or all-0xff prefix ranges to the end, `"\0"`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Header {
    #[serde(deserialize_with = "int")]
    pub revision: i64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct KeyValue {
    #[serde(deserialize_with = "bytes")]
    pub key: Vec<u8>,
    #[serde(deserialize_with = "int")]
    pub create_revision: i64,
    #[serde(deserialize_with = "int")]
    pub mod_revision: i64,
    #[serde(deserialize_with = "bytes")]
    pub value: Vec<u8>,
    #[serde(deserialize_with = "int")]
    pub lease: i64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RangeResponse {
    pub header: Header,
    pub kvs: Vec<KeyValue>,
    /// Set when a limit cut the answer short.
    pub more: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct PutResponse {
    pub header: Header,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct DeleteRangeResponse {
    pub header: Header,
    #[serde(deserialize_with = "int")]
    pub deleted: i64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ResponseOp {
    pub response_range: Option<RangeResponse>,
    pub response_put: Option<PutResponse>,
    pub response_delete_range: Option<DeleteRangeResponse>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct TxnResponse {
    pub header: Header,
    pub succeeded: bool,
    pub responses: Vec<ResponseOp>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct LeaseGrantResponse {
    #[serde(rename = "ID", deserialize_with = "int")]
    pub id: i64,
    #[serde(rename = "TTL", deserialize_with = "int")]
    pub ttl: i64,
    pub error: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct LeaseKeepAliveResponse {
    /// The lease's remaining time after this keep-alive; absent (0) when the lease
    /// is gone.
    #[serde(rename = "TTL", deserialize_with = "int")]
    pub ttl: i64,
}

/// One message of a watch stream.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct WatchResponse {
    pub header: Header,
    pub created: bool,
    pub canceled: bool,
    pub cancel_reason: String,
    pub events: Vec<Event>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Event {
    /// `DELETE`, or absent (the zero value) for a put.
    #[serde(rename = "type")]
    pub kind: String,
    pub kv: KeyValue,
}

/// keepalive is a streaming call: the gateway wraps each message in `result`, or
/// sends an `error` object instead.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StreamMessage<T> {
    pub result: Option<T>,
    pub error: Option<StreamError>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StreamError {
    pub grpc_code: i32,
    pub message: String,
}

impl StreamError {
    /// The refusal this message of `member`'s stream carries.
    pub fn refused_by(self, member: String) -> EtcdError {
        EtcdError::Refused {
            member,
            code: self.grpc_code,
            message: self.message,
        }
    }
}

/// What the gateway answers instead of a response when etcd refused the request.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct GatewayError {
    pub code: i32,
    pub error: String,
    pub message: String,
}

/// gRPC status codes that mean "this member cannot serve now, another one may".
pub const UNAVAILABLE: i32 = 14;
pub const NOT_FOUND: i32 = 5;

fn int<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        Number(i64),
        Text(String),
    }
    match Int::deserialize(deserializer)? {
        Int::Number(n) => Ok(n),
        Int::Text(text) => text.parse().map_err(serde::de::Error::custom),
    }
}

fn bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
    let text = String::deserialize(deserializer)?;
    STANDARD.decode(text).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/sf/"), b"/sf0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }

    #[test]
    fn reads_what_the_gateway_sends() {
        // As etcd 3.4's gateway answered a txn whose compare failed.
        let text = r#"{"header":{"cluster_id":"15118495548433857066","revision":"3"},
            "responses":[{"response_range":{"header":{"revision":"3"},"kvs":[{"key":"bG9jaw==",
            "create_revision":"3","mod_revision":"3","version":"1","value":"eA==",
            "lease":"4111120240432613133"}],"count":"1"}}]}"#;
        let txn: TxnResponse = serde_json::from_str(text).unwrap();
        assert!(!txn.succeeded);
        let kv = &txn.responses[0].response_range.as_ref().unwrap().kvs[0];
        assert_eq!(kv.key, b"lock");
        assert_eq!(kv.value, b"x");
        assert_eq!((kv.create_revision, kv.lease), (3, 4111120240432613133));
        let gone: StreamMessage<LeaseKeepAliveResponse> =
            serde_json::from_str(r#"{"result":{"header":{"revision":"4"},"ID":"7"}}"#).unwrap();
        assert_eq!(gone.result.unwrap().ttl, 0);
        let refused: GatewayError = serde_json::from_str(
            r#"{"error":"etcdserver: request is too large","message":"etcdserver: request is too large","code":3}"#,
        )
        .unwrap();
        assert_eq!(refused.code, 3);
        // As etcd 3.4's gateway streamed a watch: created, a put, a delete.
        let created: StreamMessage<WatchResponse> =
            serde_json::from_str(r#"{"result":{"header":{"revision":"2"},"created":true}}"#)
                .unwrap();
        assert!(created.result.unwrap().created);
        let put: StreamMessage<WatchResponse> = serde_json::from_str(
            r#"{"result":{"header":{"revision":"3"},"events":[{"kv":{"key":"a2V5","create_revision":"2","mod_revision":"3","version":"2","value":"dw=="}}]}}"#,
        )
        .unwrap();
        assert_eq!(put.result.unwrap().events[0].kind, "");
        let delete: StreamMessage<WatchResponse> = serde_json::from_str(
            r#"{"result":{"header":{"revision":"4"},"events":[{"type":"DELETE","kv":{"key":"a2V5","mod_revision":"4"}}]}}"#,
        )
        .unwrap();
        assert_eq!(delete.result.unwrap().events[0].kind, "DELETE");
        let refused: StreamMessage<WatchResponse> = serde_json::from_str(
            r#"{"result":{"header":{"revision":"4"},"watch_id":"-1","created":true,"canceled":true,"cancel_reason":"rpc error: code = Unauthenticated desc = etcdserver: invalid auth token"}}"#,
        )
        .unwrap();
        let refused = refused.result.unwrap();
        assert!(refused.canceled && refused.cancel_reason.contains("invalid auth token"));
    }
}
