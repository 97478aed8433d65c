//! `cairn export RUN` and `cairn import FILE`: a run (its row and every event with its chain
//! hash) as JSON lines, and back into another store, checked against the hash chain.
//!
//! The file is a header line, then one line per event. The payload travels as base64 of the
//! exact bytes stored, so the importing store recomputes the same chain from the run's genesis
//! hash and ends at the same head; the decoded `event` is for people and tools and is ignored
//! on import. See docs/CLI.md (`cairn export`) for the schema.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use cairn_engine::Event;
use cairn_storage::{
    EventStore, Hash, NewEvent, NewRun, RunId, RunStatus, RunUpdate, Seq, genesis_hash, record_hash,
};
use serde::{Deserialize, Serialize};

use crate::audit::{each_event, hex, parse_run_id, run_meta};
use crate::commands::{open_ro, open_rw};

/// The `format` of the header line.
pub const FORMAT: &str = "cairn-export";
/// The export format version this binary writes and reads.
pub const VERSION: u32 = 1;

/// Events per write when importing.
const BATCH_EVENTS: usize = 1024;
/// Payload bytes per write when importing (a batch ends at whichever limit comes first).
const BATCH_BYTES: usize = 4 << 20;

/// Line 1 of an export.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    run: String,
    workflow: String,
    version_of_workflow: u32,
    status: String,
    parent: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    events: u64,
    head: String,
    #[serde(default)]
    created_us: Option<i64>,
    #[serde(default)]
    updated_us: Option<i64>,
    #[serde(default)]
    wake_at_us: Option<i64>,
}

/// Lines 2…: one event.
#[derive(Debug, Serialize, Deserialize)]
struct Line {
    seq: u64,
    ts_us: i64,
    hash: String,
    payload: String,
    /// The decoded event (informational; not read on import).
    #[serde(default)]
    event: serde_json::Value,
}

fn parse_hash(s: &str) -> Option<Hash> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut h = [0u8; 32];
    for (i, b) in h.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(h)
}

/// `cairn export RUN [--output FILE]`.
pub async fn export(path: &Path, run: &str, output: Option<&Path>) -> Result<ExitCode> {
    let id = parse_run_id(run)?;
    let store = open_ro(path)?;
    // The row is read once: its event count and head are a consistent snapshot, and the events
    // up to that count never change, so a run that is still being written exports as it was.
    let meta = run_meta(&store, id).await?;
    let header = Header {
        format: FORMAT.into(),
        version: VERSION,
        run: id.to_string(),
        workflow: meta.workflow.clone(),
        version_of_workflow: meta.version,
        status: meta.status.as_str().into(),
        parent: meta.parent.map(|p| p.to_string()),
        labels: meta.labels.clone(),
        events: meta.events,
        head: hex(&meta.head),
        created_us: Some(meta.created_us),
        updated_us: Some(meta.updated_us),
        wake_at_us: meta.wake_at_us,
    };
    // To a file: write beside it and rename at the end, so a failed export leaves no half file.
    let (sink, tmp): (Box<dyn Write>, Option<PathBuf>) = match output {
        Some(p) if p != Path::new("-") => {
            let mut name = p.as_os_str().to_owned();
            name.push(".partial");
            let tmp = PathBuf::from(name);
            let f =
                File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
            (Box::new(f), Some(tmp))
        }
        _ => (Box::new(std::io::stdout().lock()), None),
    };
    let mut out = BufWriter::new(sink);
    let result = async {
        writeln!(out, "{}", serde_json::to_string(&header)?)?;
        let mut prev = genesis_hash(id);
        let mut count = 0u64;
        each_event(&store, id, Some(meta.events), |e| {
            // Export only what verifies: an export is meant to be checked elsewhere.
            let h = record_hash(&prev, e.seq, e.ts_us, &e.payload);
            if e.seq.0 != count || h != e.hash {
                bail!(
                    "event {} of run {id} does not match the hash chain; see `cairn verify {id}`",
                    e.seq
                );
            }
            prev = h;
            count += 1;
            let event = match Event::decode(&e.payload) {
                Ok(ev) => ev.to_json(),
                Err(err) => serde_json::json!({ "kind": "undecodable", "error": err.to_string() }),
            };
            let line = Line {
                seq: e.seq.0,
                ts_us: e.ts_us,
                hash: hex(&e.hash),
                payload: B64.encode(&e.payload),
                event,
            };
            writeln!(out, "{}", serde_json::to_string(&line)?)?;
            Ok(())
        })
        .await?;
        if count != meta.events || prev != meta.head {
            bail!(
                "run {id} has {count} readable events but its row says {}; see `cairn verify {id}`",
                meta.events
            );
        }
        out.flush()?;
        Ok::<(), anyhow::Error>(())
    }
    .await;
    let written = match result {
        Ok(()) => out
            .into_inner()
            .map_err(|e| anyhow!(e.into_error()))
            .map(drop),
        Err(e) => Err(e),
    };
    match (written, &tmp, output) {
        (Ok(()), Some(tmp), Some(dest)) => {
            std::fs::rename(tmp, dest).with_context(|| {
                format!("cannot rename {} to {}", tmp.display(), dest.display())
            })?;
            println!(
                "exported run {id} ({} v{}, {}): {} events, head {} to {}",
                meta.workflow,
                meta.version,
                meta.status,
                meta.events,
                hex(&meta.head),
                dest.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        (Ok(()), _, _) => Ok(ExitCode::SUCCESS),
        (Err(e), tmp, _) => {
            if let Some(t) = tmp {
                let _ = std::fs::remove_file(t);
            }
            // A closed pipe (`cairn export RUN | head`) is a normal way to stop reading.
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            {
                return Ok(ExitCode::SUCCESS);
            }
            Err(e)
        }
    }
}

/// An export's header, checked, with its typed fields.
struct Checked {
    header: Header,
    id: RunId,
    status: RunStatus,
    parent: Option<RunId>,
    head: Hash,
}

/// Reads and checks the header (line 1).
fn read_header(file: &Path, line: Option<std::io::Result<String>>) -> Result<Checked> {
    let where_ = format!("{}:1", file.display());
    let line = match line {
        None => bail!("{} is empty; it is not a cairn export", file.display()),
        Some(l) => l.with_context(|| format!("cannot read {}", file.display()))?,
    };
    let header: Header = serde_json::from_str(&line)
        .map_err(|e| anyhow!("{where_}: not a cairn export header ({e})"))?;
    if header.format != FORMAT {
        bail!(
            "{where_}: the format is `{}`, not `{FORMAT}`",
            header.format
        );
    }
    if header.version != VERSION {
        bail!(
            "{where_}: export format version {} is not supported (this cairn reads version {VERSION}); upgrade cairn",
            header.version
        );
    }
    let id: RunId = header
        .run
        .parse()
        .map_err(|e| anyhow!("{where_}: bad run id: {e}"))?;
    let status: RunStatus = header
        .status
        .parse()
        .map_err(|e| anyhow!("{where_}: {e}"))?;
    let parent = header
        .parent
        .as_deref()
        .map(str::parse::<RunId>)
        .transpose()
        .map_err(|e| anyhow!("{where_}: bad parent run id: {e}"))?;
    let head = parse_hash(&header.head)
        .ok_or_else(|| anyhow!("{where_}: `head` is not a 64-digit hex hash"))?;
    Ok(Checked {
        header,
        id,
        status,
        parent,
        head,
    })
}

/// Reads the event lines of an export (after the header), checking each against the hash
/// chain of the run.
struct EventReader {
    file: PathBuf,
    lines: std::io::Lines<BufReader<File>>,
    /// The line number of the next line.
    line_no: usize,
    prev: Hash,
    count: u64,
}

impl EventReader {
    /// Opens `file`, skipping its header line.
    fn open(file: &Path, id: RunId) -> Result<Self> {
        let mut lines = open_lines(file)?;
        lines.next();
        Ok(EventReader {
            file: file.to_path_buf(),
            lines,
            line_no: 2,
            prev: genesis_hash(id),
            count: 0,
        })
    }

    /// The next event, checked; `None` at the end of the file.
    fn next_event(&mut self) -> Result<Option<NewEvent>> {
        loop {
            let Some(line) = self.lines.next() else {
                return Ok(None);
            };
            let n = self.line_no;
            self.line_no += 1;
            let line = line.with_context(|| format!("cannot read {}", self.file.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let at = format!("{}:{n}", self.file.display());
            let l: Line = serde_json::from_str(&line)
                .map_err(|e| anyhow!("{at}: not an export event ({e})"))?;
            if l.seq != self.count {
                bail!(
                    "{at}: expected event {} but found event {}; the export is incomplete or reordered",
                    self.count,
                    l.seq
                );
            }
            let payload = B64
                .decode(l.payload.as_bytes())
                .map_err(|e| anyhow!("{at}: the payload of event {} is not base64 ({e})", l.seq))?;
            let stored = parse_hash(&l.hash)
                .ok_or_else(|| anyhow!("{at}: the hash of event {} is not a hex hash", l.seq))?;
            let h = record_hash(&self.prev, Seq(l.seq), l.ts_us, &payload);
            if h != stored {
                bail!(
                    "{at}: event {} does not match its hash: it or an earlier event was changed; nothing was imported",
                    l.seq
                );
            }
            if let Err(e) = Event::decode(&payload) {
                bail!(
                    "{at}: event {} is not an event this cairn knows ({e}); upgrade cairn",
                    l.seq
                );
            }
            self.prev = h;
            self.count += 1;
            return Ok(Some(NewEvent {
                ts_us: l.ts_us,
                payload,
            }));
        }
    }
}

fn open_lines(file: &Path) -> Result<std::io::Lines<BufReader<File>>> {
    let f = File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    Ok(BufReader::new(f).lines())
}

/// `cairn import FILE`.
pub async fn import(path: &Path, file: &Path) -> Result<ExitCode> {
    // First pass: check everything before touching the store.
    let mut lines = open_lines(file)?;
    let c = read_header(file, lines.next())?;
    drop(lines);
    let mut reader = EventReader::open(file, c.id)?;
    while reader.next_event()?.is_some() {}
    if reader.count != c.header.events {
        bail!(
            "{}: the header says {} events but the file has {}; the export is incomplete",
            file.display(),
            c.header.events,
            reader.count
        );
    }
    if reader.prev != c.head {
        bail!(
            "{}: the header's head hash does not match the last event's hash; the export was changed",
            file.display()
        );
    }

    let store = open_rw(path)?;
    if let Some(m) = store.run(c.id).await? {
        bail!(
            "run {} already exists in {} ({} events, {}); import does not replace runs",
            c.id,
            path.display(),
            m.events,
            m.status
        );
    }

    // Second pass: write in batches (the run is created with the first). The file is checked
    // again on the way, in case it changed in between.
    let mut reader = EventReader::open(file, c.id)?;
    let mut created = false;
    let mut head = genesis_hash(c.id);
    loop {
        let mut batch: Vec<NewEvent> = Vec::new();
        let mut bytes = 0usize;
        while batch.len() < BATCH_EVENTS && bytes < BATCH_BYTES {
            let Some(e) = reader.next_event()? else { break };
            bytes += e.payload.len();
            batch.push(e);
        }
        let last = batch.is_empty();
        if !created {
            let run = NewRun {
                id: c.id,
                workflow: c.header.workflow.clone(),
                version: c.header.version_of_workflow,
                parent: c.parent,
                labels: c.header.labels.clone(),
                status: c.status,
            };
            head = store.create_run(run, batch).await?.head;
            created = true;
        } else if !last {
            head = store.write(c.id, batch, RunUpdate::default()).await?.head;
        }
        if last {
            break;
        }
    }
    if reader.count != c.header.events || reader.prev != c.head {
        bail!(
            "{} changed while it was imported; run {} may be incomplete (check it with `cairn verify {}`)",
            file.display(),
            c.id,
            c.id
        );
    }
    if c.status == RunStatus::Waiting
        && let Some(t) = c.header.wake_at_us
    {
        store
            .write(
                c.id,
                Vec::new(),
                RunUpdate {
                    wake_at_us: Some(Some(t)),
                    ..RunUpdate::default()
                },
            )
            .await?;
    }
    store.flush().await?;
    if head != c.head {
        bail!(
            "run {} was imported but its head is {}, not the export's {}; check it with `cairn verify {}`",
            c.id,
            hex(&head),
            c.header.head,
            c.id
        );
    }
    let report = store.verify(c.id).await?;
    if let Some(p) = &report.problem {
        bail!("run {} was imported but does not verify: {p}", c.id);
    }
    println!(
        "imported run {} ({} v{}, {}): {} events, head {}",
        c.id, c.header.workflow, c.header.version_of_workflow, c.status, report.events, report.head
    );
    Ok(ExitCode::SUCCESS)
}
