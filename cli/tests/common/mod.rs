//! Helpers shared by the end-to-end tests of the `cairn` binary: spawning it against a temporary
//! store, waiting for conditions with timeouts, and parsing what it prints.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod otlp;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a one-shot command may take before the test gives up on it.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a condition on a running child may take to become true.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(60);

/// A temporary directory holding one store file (`s.redb`), removed when dropped.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
}

impl Env {
    /// A fresh directory; the store file does not exist yet.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("create a temp dir");
        let store = dir.path().join("s.redb");
        Env { dir, store }
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `cairn --store <store> <args>` to the end.
    pub fn run(&self, args: &[&str]) -> Out {
        run_at(&self.store, args)
    }

    /// Starts `cairn --store <store> <args>` in the background.
    pub fn spawn(&self, args: &[&str]) -> Proc {
        Proc::spawn(&self.store, args)
    }

    /// `runs --json`, parsed.
    pub fn runs_json(&self) -> Vec<Value> {
        let out = self.run(&["runs", "--json"]);
        out.assert_ok();
        parse_json_array(&out.stdout)
    }

    /// The `runs --json` entry of run `id`, if the store can be read and has it.
    pub fn try_run_meta(&self, id: &str) -> Option<Value> {
        let out = self.run(&["runs", "--json"]);
        if !out.success() {
            return None;
        }
        let runs: Vec<Value> = serde_json::from_str(&out.stdout).ok()?;
        runs.into_iter().find(|r| r["run"] == id)
    }

    /// The `runs --json` entry of run `id`; panics if absent.
    pub fn run_meta(&self, id: &str) -> Value {
        self.runs_json()
            .into_iter()
            .find(|r| r["run"] == id)
            .unwrap_or_else(|| panic!("run {id} is not listed by `cairn runs --json`"))
    }

    /// `events <id>`, one parsed JSON object per line.
    pub fn events_json(&self, id: &str) -> Vec<Value> {
        let out = self.run(&["events", id]);
        out.assert_ok();
        json_lines(&out.stdout)
    }

    /// Waits until run `id` has recorded more than `n` events (polling `runs --json`, a
    /// read-only open that works while the writer runs); returns the count seen.
    pub fn wait_events_over(&self, id: &str, n: u64) -> u64 {
        wait_for(
            WAIT_TIMEOUT,
            &format!("run {id} to record more than {n} events"),
            || {
                let events = self.try_run_meta(id)?["events"].as_u64()?;
                (events > n).then_some(events)
            },
        )
    }
}

/// The path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_cairn")
}

/// `cairn --store <store> <args>`, isolated from the caller's environment.
pub fn command(store: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.arg("--store").arg(store).args(args);
    c.env_remove("CAIRN_STORE").env_remove("RUST_LOG");
    if let Some(dir) = store.parent() {
        c.current_dir(dir);
    }
    c
}

/// What a finished command printed and how it exited.
#[derive(Debug)]
pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panics with everything printed unless the command exited 0.
    pub fn assert_ok(&self) -> &Self {
        assert!(self.success(), "expected success, got {self:#?}");
        self
    }

    /// Asserts a failure (nonzero exit) reported as exactly one non-empty line on stderr, and
    /// returns that line.
    pub fn assert_one_line_error(&self) -> &str {
        assert!(
            !self.success() && self.code().is_some(),
            "expected a nonzero exit, got {self:#?}"
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert!(
            lines.len() == 1 && !lines[0].trim().is_empty(),
            "expected exactly one non-empty line on stderr, got {:?}",
            self.stderr
        );
        lines[0]
    }

    /// The JSON after `output: ` on stdout.
    pub fn output_json(&self) -> Value {
        output_json(&self.stdout)
    }
}

/// Runs `cairn --store <store> <args>` to the end (with a timeout).
pub fn run_at(store: &Path, args: &[&str]) -> Out {
    Proc::spawn(store, args).finish(CMD_TIMEOUT)
}

/// A `cairn` child process whose stdout and stderr are collected in the background.
pub struct Proc {
    child: Child,
    args: Vec<String>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

fn collect(mut from: impl Read + Send + 'static, into: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => into
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
    })
}

impl Proc {
    /// Starts `cairn --store <store> <args>`.
    pub fn spawn(store: &Path, args: &[&str]) -> Proc {
        Proc::spawn_with_env(store, args, &[])
    }

    /// [`Proc::spawn`] with these environment variables set.
    pub fn spawn_with_env(store: &Path, args: &[&str], vars: &[(&str, &str)]) -> Proc {
        let mut cmd = command(store, args);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cairn");
        let stdout = Arc::default();
        let stderr = Arc::default();
        let readers = vec![
            collect(child.stdout.take().unwrap(), Arc::clone(&stdout)),
            collect(child.stderr.take().unwrap(), Arc::clone(&stderr)),
        ];
        Proc {
            child,
            args: args.iter().map(|s| s.to_string()).collect(),
            stdout,
            stderr,
            readers,
            status: None,
        }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits in i32")
    }

    /// What the child printed on stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// What the child printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends `sig` to the child (and only to it).
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on the pid of our own child, which we have not reaped yet.
        let r = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(r, 0, "kill({}, {sig}) failed", self.pid());
    }

    /// The exit status, if the child has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// SIGKILLs the child (unless it has already exited) and reaps it; returns whether the
    /// signal was sent to a live process.
    pub fn kill9(&mut self) -> bool {
        if self.try_status().is_some() {
            return false;
        }
        self.signal(libc::SIGKILL);
        self.status = Some(self.child.wait().expect("wait"));
        true
    }

    /// Waits (polling) until the child exits; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.try_status() {
                return s;
            }
            if start.elapsed() > timeout {
                self.kill9();
                panic!(
                    "cairn {:?} did not exit within {timeout:?}\nstdout: {}\nstderr: {}",
                    self.args,
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the child to exit and for its output to be fully collected.
    pub fn finish(mut self, timeout: Duration) -> Out {
        let status = self.wait_exit(timeout);
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Out {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }

    /// Waits for the child's first stdout line (`run <ID> started: …`) and returns the run id.
    pub fn wait_run_id(&mut self) -> String {
        let line = wait_for(WAIT_TIMEOUT, "the child's first stdout line", || {
            let out = self.stdout();
            if let Some((first, _)) = out.split_once('\n') {
                return Some(first.to_string());
            }
            if let Some(s) = self.try_status() {
                panic!(
                    "cairn {:?} exited ({s}) before printing its run id\nstdout: {out}\nstderr: {}",
                    self.args,
                    self.stderr()
                );
            }
            None
        });
        assert!(line.contains(" started"), "unexpected first line {line:?}");
        run_id_of(&line)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Never leave a child running after a failed assertion.
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `f` until it returns `Some`, panicking with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() <= timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `s` looks like a run id: a 26-character ULID in Crockford base32.
pub fn is_run_id(s: &str) -> bool {
    s.len() == 26
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b.is_ascii_uppercase() && !b"ILOU".contains(&b)))
}

/// The run id in a line `run <ID> …`.
pub fn run_id_of(line: &str) -> String {
    let id = line
        .strip_prefix("run ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no `run <ID>` in {line:?}"));
    assert!(is_run_id(id), "`{id}` in {line:?} is not a run id");
    id.to_string()
}

/// The JSON after `output: ` in a command's stdout.
pub fn output_json(stdout: &str) -> Value {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("output: "))
        .unwrap_or_else(|| panic!("no `output:` line in {stdout:?}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("output {line:?} is not JSON: {e}"))
}

/// One JSON value per non-empty line.
pub fn json_lines(s: &str) -> Vec<Value> {
    s.lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?} is not JSON: {e}")))
        .collect()
}

/// A JSON array.
pub fn parse_json_array(s: &str) -> Vec<Value> {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{s:?} is not a JSON array: {e}"))
}

/// Asserts that events' `seq` fields are exactly `0..n`.
pub fn assert_dense_seq(events: &[Value]) {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(
            e["seq"].as_u64(),
            Some(i as u64),
            "event {i} has seq {}",
            e["seq"]
        );
    }
}

/// The sum of the values of a JSON object of counts.
pub fn sum_counts(v: &Value) -> u64 {
    v.as_object()
        .unwrap_or_else(|| panic!("{v} is not an object"))
        .values()
        .map(|c| c.as_u64().expect("a count"))
        .sum()
}

/// splitmix64: a small deterministic generator, so a printed seed reproduces a test's choices.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }
}

/// `CAIRN_TEST_SEED` if set, else a fresh seed from the clock.
pub fn test_seed() -> u64 {
    match std::env::var("CAIRN_TEST_SEED") {
        Ok(s) => s.trim().parse().expect("CAIRN_TEST_SEED must be a u64"),
        Err(_) => now_us() as u64,
    }
}

/// Wall-clock microseconds since the epoch (the clock the store stamps events with).
pub fn now_us() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(d.as_micros()).expect("µs fit in i64")
}

/// Sleeps until the wall-clock time `t_us` (returns at once if it has passed).
pub fn sleep_until_us(t_us: i64) {
    let left = t_us - now_us();
    if left > 0 {
        std::thread::sleep(Duration::from_micros(left as u64));
    }
}

/// The events of `kind`, in log order.
pub fn events_of<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["kind"] == kind).collect()
}

/// The only event of `kind`; panics unless there is exactly one.
pub fn the_event<'a>(events: &'a [Value], kind: &str) -> &'a Value {
    let found = events_of(events, kind);
    assert_eq!(
        found.len(),
        1,
        "expected exactly one `{kind}` event, found {}: {found:?}",
        found.len()
    );
    found[0]
}

/// The lines of a text file (none if it does not exist).
pub fn file_lines(path: &Path) -> Vec<String> {
    match std::fs::read_to_string(path) {
        Ok(t) => t.lines().map(str::to_string).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("read {}: {e}", path.display()),
    }
}

impl Env {
    /// `events <id>`, parsed, if the store can be read and has the run.
    pub fn try_events_json(&self, id: &str) -> Option<Vec<Value>> {
        let out = self.run(&["events", id]);
        out.success().then(|| json_lines(&out.stdout))
    }

    /// Waits until run `id` has an event of `kind` in its log; returns the log as then read
    /// and the first such event.
    pub fn wait_event(&self, id: &str, kind: &str) -> (Vec<Value>, Value) {
        wait_for(
            WAIT_TIMEOUT,
            &format!("run {id} to record a `{kind}` event"),
            || {
                let events = self.try_events_json(id)?;
                let e = events.iter().find(|e| e["kind"] == kind)?.clone();
                Some((events, e))
            },
        )
    }

    /// Waits until `runs --json` lists run `id` with `status`; returns that entry.
    pub fn wait_status(&self, id: &str, status: &str) -> Value {
        wait_for(WAIT_TIMEOUT, &format!("run {id} to be {status}"), || {
            self.try_run_meta(id).filter(|m| m["status"] == status)
        })
    }
}

impl Proc {
    /// Waits (polling every `poll`) until the child's stdout has a line containing `needle`,
    /// and returns that line; panics if the child exits first or after [`WAIT_TIMEOUT`].
    pub fn wait_stdout_line(&mut self, needle: &str, poll: Duration) -> String {
        let start = Instant::now();
        let mut exited_at: Option<Instant> = None;
        loop {
            let out = self.stdout();
            if let Some(l) = out.lines().find(|l| l.contains(needle)) {
                // Only a complete line counts.
                if out.contains(&format!("{l}\n")) {
                    return l.to_string();
                }
            }
            // After an exit, give the readers a moment to collect the last output.
            if let Some(s) = self.try_status() {
                let exited = *exited_at.get_or_insert_with(Instant::now);
                if exited.elapsed() > Duration::from_secs(2) {
                    panic!(
                        "cairn {:?} exited ({s}) without printing {needle:?}\nstdout: {out}\nstderr: {}",
                        self.args,
                        self.stderr()
                    );
                }
            }
            assert!(
                start.elapsed() <= WAIT_TIMEOUT,
                "cairn {:?} did not print {needle:?} within {WAIT_TIMEOUT:?}\nstdout: {out}\nstderr: {}",
                self.args,
                self.stderr()
            );
            std::thread::sleep(poll);
        }
    }
}

/// The control socket of the process holding `store` (`<store>.sock`).
pub fn control_socket(store: &Path) -> PathBuf {
    let mut s = store.as_os_str().to_owned();
    s.push(".sock");
    PathBuf::from(s)
}

impl Proc {
    /// Starts `cairn --store <store> <args>` without the environment variables `unset` (e.g.
    /// `ANTHROPIC_API_KEY`, so a test never sends a real key anywhere).
    pub fn spawn_without(store: &Path, args: &[&str], unset: &[&str]) -> Proc {
        let mut c = command(store, args);
        for v in unset {
            c.env_remove(v);
        }
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cairn");
        let stdout = Arc::default();
        let stderr = Arc::default();
        let readers = vec![
            collect(child.stdout.take().unwrap(), Arc::clone(&stdout)),
            collect(child.stderr.take().unwrap(), Arc::clone(&stderr)),
        ];
        Proc {
            child,
            args: args.iter().map(|s| s.to_string()).collect(),
            stdout,
            stderr,
            readers,
            status: None,
        }
    }
}

/// The environment variables of model API keys, removed from the children of agent tests.
pub const API_KEY_VARS: [&str; 2] = ["ANTHROPIC_API_KEY", "OPENAI_API_KEY"];

impl Env {
    /// Starts `cairn --store <store> <args>` in the background without API keys in its
    /// environment.
    pub fn spawn_keyless(&self, args: &[&str]) -> Proc {
        Proc::spawn_without(&self.store, args, &API_KEY_VARS)
    }

    /// Runs `cairn --store <store> <args>` to the end without API keys in its environment.
    pub fn run_keyless(&self, args: &[&str]) -> Out {
        self.spawn_keyless(args).finish(CMD_TIMEOUT)
    }
}

// ---- A fake HTTP/1.1 server on loopback, for the agent tests (a small, thread-based copy of
// ---- agents/tests/fake: scripted replies, optional delays, counted and recorded requests).

/// One request as the fake server read it.
#[derive(Clone, Debug)]
pub struct FakeRequest {
    /// `POST`, `GET`, ...
    pub method: String,
    /// The request target, e.g. `/v1/messages`.
    pub path: String,
    /// Headers, names lowercased, in order.
    pub headers: Vec<(String, String)>,
    /// The body (Content-Length bytes).
    pub body: Vec<u8>,
    /// When its body had been read.
    pub at: Instant,
}

impl FakeRequest {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON (`null` if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The number of assistant messages in a Messages request: the turn it asks for (0-based).
    pub fn assistant_turns(&self) -> usize {
        self.json()["messages"]
            .as_array()
            .map_or(0, |m| m.iter().filter(|m| m["role"] == "assistant").count())
    }
}

/// What the fake server answers.
#[derive(Clone, Debug)]
pub struct FakeReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub delay: Duration,
}

impl FakeReply {
    /// A JSON reply.
    pub fn json(status: u16, body: Value) -> Self {
        FakeReply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: serde_json::to_vec(&body).unwrap(),
            delay: Duration::ZERO,
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Waits this long before answering.
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
}

type FakeHandler = dyn Fn(usize, &FakeRequest) -> FakeReply + Send + Sync;

struct FakeState {
    requests: Mutex<Vec<FakeRequest>>,
    handler: Box<FakeHandler>,
    stop: std::sync::atomic::AtomicBool,
}

/// A running fake server (a thread per connection); stopped when dropped.
pub struct FakeServer {
    addr: std::net::SocketAddr,
    state: Arc<FakeState>,
    acceptor: Option<JoinHandle<()>>,
}

impl FakeServer {
    /// Starts a server answering request number `i` (from 0) with `handler(i, &request)`.
    pub fn start(
        handler: impl Fn(usize, &FakeRequest) -> FakeReply + Send + Sync + 'static,
    ) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the fake server");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(FakeState {
            requests: Mutex::new(Vec::new()),
            handler: Box::new(handler),
            stop: std::sync::atomic::AtomicBool::new(false),
        });
        let st = Arc::clone(&state);
        let acceptor = std::thread::spawn(move || {
            for sock in listener.incoming() {
                if st.stop.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                if let Ok(sock) = sock {
                    let st = Arc::clone(&st);
                    std::thread::spawn(move || fake_serve(sock, st));
                }
            }
        });
        FakeServer {
            addr,
            state,
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many requests were received.
    pub fn count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    /// All requests received, in order.
    pub fn requests(&self) -> Vec<FakeRequest> {
        self.state.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.state
            .stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the acceptor so it sees the flag.
        let _ = std::net::TcpStream::connect(self.addr);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

fn fake_serve(mut sock: std::net::TcpStream, st: Arc<FakeState>) {
    use std::io::Write;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p;
            }
            match sock.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or("").split(' ');
        let method = first.next().unwrap_or("").to_string();
        let path = first.next().unwrap_or("").to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < len {
            match sock.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..len).collect();
        let req = FakeRequest {
            method,
            path,
            headers,
            body,
            at: Instant::now(),
        };
        let i = {
            let mut all = st.requests.lock().unwrap();
            all.push(req.clone());
            all.len() - 1
        };
        let reply = (st.handler)(i, &req);
        if !reply.delay.is_zero() {
            std::thread::sleep(reply.delay);
        }
        let mut out = format!("HTTP/1.1 {} Fake\r\n", reply.status);
        for (k, v) in &reply.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str(&format!("content-length: {}\r\n\r\n", reply.body.len()));
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&reply.body);
        if sock.write_all(&bytes).is_err() || sock.flush().is_err() {
            return;
        }
    }
}

/// An Anthropic `message` answer with these content blocks and stop reason.
pub fn anthropic_message(content: Value, stop: &str) -> FakeReply {
    FakeReply::json(
        200,
        serde_json::json!({
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": "claude-haiku-4-5",
            "content": content,
            "stop_reason": stop,
            "stop_sequence": null,
            "usage": {"input_tokens": 30, "output_tokens": 10}
        }),
    )
}

/// An Anthropic error answer.
pub fn anthropic_error(status: u16, etype: &str, message: &str) -> FakeReply {
    FakeReply::json(
        status,
        serde_json::json!({"type": "error", "error": {"type": etype, "message": message}}),
    )
}

// ---- audit, show --step, export and import (cli/tests/audit.rs) ----

impl Env {
    /// Writes `lines` as a JSON-lines file `name` in the directory and returns its path.
    pub fn write_jsonl(&self, name: &str, lines: &[Value]) -> PathBuf {
        let path = self.path(name);
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// Runs `cairn --store <dir>/<store> <args>`: the same binary against another store file
    /// in the directory.
    pub fn run_on(&self, store: &str, args: &[&str]) -> Out {
        run_at(&self.path(store), args)
    }
}

/// Lines in a side-effect file (0 if it does not exist yet).
pub fn line_count(file: &std::path::Path) -> u64 {
    std::fs::read(file)
        .map(|b| b.iter().filter(|&&c| c == b'\n').count() as u64)
        .unwrap_or(0)
}

/// Waits until the side-effect file has at least `target` lines, then after `delay` (so kills
/// land both between a side effect and its record and elsewhere) SIGKILLs the child. Returns
/// false if the child exited on its own first.
pub fn kill_at_lines(
    child: &mut Proc,
    file: &std::path::Path,
    target: u64,
    delay: Duration,
) -> bool {
    let start = std::time::Instant::now();
    loop {
        if line_count(file) >= target {
            std::thread::sleep(delay);
            return child.kill9();
        }
        if child.try_status().is_some() {
            return false;
        }
        assert!(
            start.elapsed() < WAIT_TIMEOUT,
            "the child did not reach {target} side effects within {WAIT_TIMEOUT:?}; stderr: {}",
            child.stderr()
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}
