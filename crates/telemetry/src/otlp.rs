//! OTLP/HTTP export with the JSON encoding (`POST {endpoint}` with
//! `application/json`), which every OpenTelemetry collector accepts: no gRPC
//! or protobuf stack in the build. Ids are hex strings and times are
//! nanosecond strings, as the OTLP JSON mapping requires.

use crate::trace::SpanRecord;
use serde_json::{json, Value};
use std::time::Duration;

/// Posts span batches to a collector's `/v1/traces` URL.
pub struct OtlpExporter {
    endpoint: String,
    service: String,
    agent: ureq::Agent,
}

impl OtlpExporter {
    pub fn new(endpoint: impl Into<String>, service: impl Into<String>) -> OtlpExporter {
        OtlpExporter {
            endpoint: endpoint.into(),
            service: service.into(),
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(5))
                .build(),
        }
    }

    /// Sends one batch (blocking: call it from a blocking thread).
    pub fn export(&self, spans: &[SpanRecord]) -> Result<(), String> {
        if spans.is_empty() {
            return Ok(());
        }
        let body = encode(spans, &self.service);
        self.agent
            .post(&self.endpoint)
            .set("content-type", "application/json")
            .send_string(&body.to_string())
            .map(|_| ())
            .map_err(|e| format!("OTLP export to {} failed: {e}", self.endpoint))
    }
}

/// The `ExportTraceServiceRequest` of a batch, in OTLP JSON.
pub fn encode(spans: &[SpanRecord], service: &str) -> Value {
    let spans: Vec<Value> = spans
        .iter()
        .map(|s| {
            let start = s.start_us as i128 * 1000;
            let end = start + s.duration_us as i128 * 1000;
            let mut attributes: Vec<Value> = s
                .attrs
                .iter()
                .map(|(k, v)| json!({ "key": k, "value": any_value(v) }))
                .collect();
            if s.db_calls > 0 {
                attributes.push(
                    json!({"key": "db.calls", "value": {"intValue": s.db_calls.to_string()}}),
                );
                attributes
                    .push(json!({"key": "db.time_us", "value": {"intValue": s.db_us.to_string()}}));
            }
            let kind = match s.name.as_str() {
                "request" => 2, // SERVER
                "publish" => 4, // PRODUCER
                "event" => 5,   // CONSUMER
                _ => 1,         // INTERNAL
            };
            let mut span = json!({
                "traceId": s.trace_id,
                "spanId": s.span_id,
                "name": s.name,
                "kind": kind,
                "startTimeUnixNano": start.to_string(),
                "endTimeUnixNano": end.to_string(),
                "attributes": attributes,
            });
            if let Some(p) = &s.parent_id {
                span["parentSpanId"] = json!(p);
            }
            span
        })
        .collect();
    json!({
        "resourceSpans": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
            "scopeSpans": [{"scope": {"name": "flowline"}, "spans": spans}],
        }]
    })
}

fn any_value(v: &Value) -> Value {
    match v {
        Value::Bool(b) => json!({ "boolValue": b }),
        Value::Number(n) if n.is_i64() || n.is_u64() => json!({ "intValue": n.to_string() }),
        Value::Number(n) => json!({ "doubleValue": n.as_f64() }),
        Value::String(s) => json!({ "stringValue": s }),
        other => json!({ "stringValue": other.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};

    fn span() -> SpanRecord {
        let mut attrs = serde_json::Map::new();
        attrs.insert("route".into(), json!("/api/v1/orders"));
        attrs.insert("status".into(), json!(201));
        SpanRecord {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            span_id: "00f067aa0ba902b7".into(),
            parent_id: None,
            name: "request".into(),
            start_us: 1_700_000_000_000_000,
            duration_us: 1500,
            attrs,
            db_calls: 2,
            db_us: 300,
        }
    }

    #[test]
    fn encodes_per_the_otlp_json_mapping() {
        let v = encode(&[span()], "flowline");
        let s = &v["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(s["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(s["kind"], 2);
        assert_eq!(s["startTimeUnixNano"], "1700000000000000000");
        assert_eq!(s["endTimeUnixNano"], "1700000000001500000");
        assert!(s.get("parentSpanId").is_none());
        let attrs = s["attributes"].as_array().unwrap();
        assert!(attrs.contains(&json!({"key": "status", "value": {"intValue": "201"}})));
        assert!(attrs.contains(&json!({"key": "db.calls", "value": {"intValue": "2"}})));
    }

    /// A collector on loopback receives the batch as one HTTP POST.
    #[test]
    fn posts_a_batch_to_the_collector() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let collector = std::thread::spawn(move || {
            let (mut sock, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(sock.try_clone().unwrap());
            let mut head = String::new();
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                head.push_str(&line);
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                .unwrap();
            (head, body)
        });
        OtlpExporter::new(url, "flowline")
            .export(&[span()])
            .unwrap();
        let (head, body) = collector.join().unwrap();
        assert!(head.starts_with("POST /v1/traces "), "{head}");
        assert!(head
            .to_ascii_lowercase()
            .contains("content-type: application/json"));
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v, encode(&[span()], "flowline"));
    }
}
