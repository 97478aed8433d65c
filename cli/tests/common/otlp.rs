//! A minimal OTLP/HTTP receiver on loopback for the tests of `cairn trace` and of live export:
//! it keeps each request (traces or metrics) and decodes the protobuf bodies with the same
//! message types cairn encodes them with; and helpers to read spans and their attributes.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// One HTTP request as the receiver got it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub content_type: String,
    pub body: Vec<u8>,
}

/// A minimal OTLP/HTTP receiver on 127.0.0.1: it reads each request (one per connection),
/// keeps it, and answers 200 with an empty export response.
pub struct Receiver {
    addr: std::net::SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Receiver {
    pub fn start() -> Receiver {
        Receiver::answering("200 OK")
    }

    /// A receiver that answers every request with this status line (e.g. `404 Not Found`).
    pub fn answering(status: &'static str) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<Request>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (requests, stop) = (Arc::clone(&requests), Arc::clone(&stop));
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(mut conn) = conn else { continue };
                    if let Some(r) = read_request(&mut conn) {
                        requests.lock().unwrap().push(r);
                        let body = if status.starts_with("200") {
                            ""
                        } else {
                            "no such route"
                        };
                        let _ = conn.write_all(
                            format!(
                                "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\n\
                                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                                body.len()
                            )
                            .as_bytes(),
                        );
                    }
                }
            })
        };
        Receiver {
            addr,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn take(&self) -> Vec<Request> {
        std::mem::take(&mut *self.requests.lock().unwrap())
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_request(conn: &mut TcpStream) -> Option<Request> {
    conn.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.lines();
    let mut first = lines.next()?.split_whitespace();
    let (method, path) = (first.next()?.to_string(), first.next()?.to_string());
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers.get("content-length")?.parse().ok()?;
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Request {
        method,
        path,
        content_type: headers.get("content-type").cloned().unwrap_or_default(),
        body,
    })
}

impl Receiver {
    /// The spans of the trace requests received so far (kept), decoded.
    pub fn spans(&self) -> Vec<Span> {
        let reqs = self.requests.lock().unwrap().clone();
        let traces: Vec<ExportTraceServiceRequest> = reqs
            .iter()
            .filter(|r| r.path == "/v1/traces")
            .map(|r| {
                assert_eq!(r.method, "POST");
                assert_eq!(r.content_type, "application/x-protobuf");
                ExportTraceServiceRequest::decode(r.body.as_slice())
                    .expect("the body is an ExportTraceServiceRequest")
            })
            .collect();
        spans_of(&traces)
    }

    /// The metrics requests received so far (kept), decoded.
    pub fn metrics(&self) -> Vec<ExportMetricsServiceRequest> {
        let reqs = self.requests.lock().unwrap().clone();
        reqs.iter()
            .filter(|r| r.path == "/v1/metrics")
            .map(|r| {
                ExportMetricsServiceRequest::decode(r.body.as_slice())
                    .expect("the body is an ExportMetricsServiceRequest")
            })
            .collect()
    }

    /// Waits until `f` holds for the spans received, or panics after `timeout`.
    pub fn wait_spans(&self, timeout: Duration, f: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let start = Instant::now();
        loop {
            let spans = self.spans();
            if f(&spans) {
                return spans;
            }
            assert!(
                start.elapsed() < timeout,
                "the receiver did not get the expected spans in {timeout:?}: {spans:#?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn spans_of(reqs: &[ExportTraceServiceRequest]) -> Vec<Span> {
    reqs.iter()
        .flat_map(|r| &r.resource_spans)
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| ss.spans.clone())
        .collect()
}

pub fn value_of(attrs: &[KeyValue], key: &str) -> Option<any_value::Value> {
    attrs
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| v.value.clone())
}

pub fn attr_str(s: &Span, key: &str) -> Option<String> {
    match value_of(&s.attributes, key) {
        Some(any_value::Value::StringValue(v)) => Some(v),
        None => None,
        Some(other) => panic!("{key} of span {} is not a string: {other:?}", s.name),
    }
}

pub fn attr_int(s: &Span, key: &str) -> Option<i64> {
    match value_of(&s.attributes, key) {
        Some(any_value::Value::IntValue(v)) => Some(v),
        None => None,
        Some(other) => panic!("{key} of span {} is not an int: {other:?}", s.name),
    }
}

pub fn attr_strs(s: &Span, key: &str) -> Option<Vec<String>> {
    match value_of(&s.attributes, key) {
        Some(any_value::Value::ArrayValue(a)) => Some(
            a.values
                .iter()
                .map(|v: &AnyValue| match &v.value {
                    Some(any_value::Value::StringValue(s)) => s.clone(),
                    other => panic!("{key}: not a string {other:?}"),
                })
                .collect(),
        ),
        None => None,
        Some(other) => panic!("{key} of span {} is not an array: {other:?}", s.name),
    }
}
