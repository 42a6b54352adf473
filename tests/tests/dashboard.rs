//! The dashboard in a real browser: headless Chromium driven through
//! chromedriver (WebDriver) opens the coordinator's dashboard while a
//! training job runs on a local cluster; rank 0 crashes once mid-save, so
//! the job restarts from its last checkpoint. The loss chart must hold
//! exactly the points `flamingoctl metrics` exports (read from the DOM),
//! grow as steps arrive, mark checkpoints and the restart, break the curve
//! where the restart rewinds, and show the same curves after the
//! coordinator is SIGKILLed and restarted. Two of the job's checkpoints
//! are then evaluated (`flamingoctl eval --job` and a 2-rank `launch --job
//! eval`): the page must show their scores as the results files hold them,
//! before and after the restart. Also checked on the same run:
//! the Prometheus endpoints of the coordinator and an agent, the spans the
//! processes export to an OTLP collector (a receiver in the test, decoding
//! OpenTelemetry's protobuf), and TensorBoard event files read back by
//! TensorBoard's own reader. Screenshots are kept in
//! `target/test-artifacts/`.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use flamingo_tests::{flamingoctl, synth_eval, wait_for, ClusterSandbox, SandboxOptions};
use serde_json::{json, Value};

const SAMPLES: u64 = 512;
const PER_RANK: u64 = 4;
const WORLD: u64 = 2;
const EPOCHS: u64 = 3;
const STEPS: u64 = SAMPLES / (PER_RANK * WORLD) * EPOCHS;
/// Rank 0 of the first attempt aborts after writing this step's
/// checkpoint, before committing it: the restart resumes from step 40.
const CRASH_STEP: u64 = 80;

/// An OTLP/HTTP collector: records every exported span as (service,
/// span name, attributes).
#[derive(Clone, Default)]
struct Collector(Arc<Spans>);

impl Collector {
    fn start(&self) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a local port");
        let address = listener.local_addr().expect("bound");
        let spans = self.0.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let spans = spans.clone();
                std::thread::spawn(move || serve_otlp(stream, &spans));
            }
        });
        format!("http://{address}")
    }

    fn spans(&self) -> Vec<Span> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// An exported span: service, name, attributes.
type Span = (String, String, Vec<(String, String)>);
type Spans = Mutex<Vec<Span>>;

fn serve_otlp(stream: std::net::TcpStream, spans: &Spans) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    let mut reader = BufReader::new(stream.try_clone().expect("a socket"));
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if let Ok(request) = <ExportTraceServiceRequest as prost::Message>::decode(&body[..]) {
            let mut found = spans.lock().unwrap_or_else(|p| p.into_inner());
            for resource in request.resource_spans {
                let service = resource
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|kv| kv.key == "service.name")
                    .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                        Any::StringValue(name) => Some(name.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                for scope in resource.scope_spans {
                    for span in scope.spans {
                        let attributes = span
                            .attributes
                            .iter()
                            .map(|kv| {
                                let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                                    Some(Any::StringValue(text)) => text.clone(),
                                    Some(Any::IntValue(number)) => number.to_string(),
                                    other => format!("{other:?}"),
                                };
                                (kv.key.clone(), value)
                            })
                            .collect();
                        found.push((service.clone(), span.name.clone(), attributes));
                    }
                }
            }
        }
        let mut writer = &stream;
        let reply =
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n";
        if writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// chromedriver on a free port, stopped on drop.
struct Driver {
    child: Child,
    url: String,
    session: Option<String>,
}

impl Driver {
    fn start(profile: &Path) -> Self {
        let binary = ["chromedriver", "/usr/bin/chromedriver"]
            .into_iter()
            .find(|candidate| {
                Command::new(candidate)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|status| status.success())
            })
            .expect(
                "chromedriver not found: install Debian's chromium and chromium-driver \
                 (scripts/test.sh does when run as root)",
            );
        let port = flamingo_common::net::free_local_port().expect("a free port");
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("WebDriver or HTTP call");
        let url = format!("http://127.0.0.1:{port}");
        flamingo_launch::local::wait_for_port(&url, Duration::from_secs(20))
            .expect("chromedriver listens");
        let mut driver = Self {
            child,
            url,
            session: None,
        };
        let capabilities = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": "/usr/bin/chromium",
                    "args": [
                        "--headless=new", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", "--window-size=1400,1900",
                        format!("--user-data-dir={}", profile.display()),
                    ],
                },
            }},
        });
        let created = driver.call("POST", "/session", Some(capabilities));
        driver.session = Some(
            created["sessionId"]
                .as_str()
                .unwrap_or_else(|| panic!("no WebDriver session: {created}"))
                .to_string(),
        );
        driver
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.url);
        let request = ureq::request(method, &url).timeout(Duration::from_secs(60));
        let response = match body {
            Some(body) => request
                .set("Content-Type", "application/json")
                .send_string(&body.to_string()),
            None => request.call(),
        };
        let text = match response {
            Ok(response) => response.into_string().expect("a UTF-8 response"),
            Err(ureq::Error::Status(code, response)) => panic!(
                "WebDriver {method} {path}: {code} {}",
                response.into_string().unwrap_or_default()
            ),
            Err(error) => panic!("WebDriver {method} {path}: {error}"),
        };
        let value: Value = serde_json::from_str(&text).expect("a JSON response");
        value["value"].clone()
    }

    fn session_path(&self, tail: &str) -> String {
        format!(
            "/session/{}{tail}",
            self.session.as_deref().expect("a session")
        )
    }

    fn open(&self, url: &str) {
        self.call(
            "POST",
            &self.session_path("/url"),
            Some(json!({ "url": url })),
        );
    }

    fn run(&self, script: &str) -> Value {
        self.call(
            "POST",
            &self.session_path("/execute/sync"),
            Some(json!({ "script": script, "args": [] })),
        )
    }

    fn screenshot(&self, path: &Path) {
        let encoded = self.call("GET", &self.session_path("/screenshot"), None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().expect("base64 screenshot"))
            .expect("WebDriver or HTTP call");
        assert_eq!(&png[..4], b"\x89PNG", "a PNG screenshot");
        std::fs::create_dir_all(path.parent().expect("the artifact folder is writable"))
            .expect("the artifact folder is writable");
        std::fs::write(path, png).expect("the artifact folder is writable");
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = ureq::delete(&format!("{}/session/{session}", self.url))
                .timeout(Duration::from_secs(20))
                .call();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The loss chart's `loss_laion` curve as the DOM holds it: `[step, value]`.
const LOSS_POINTS: &str = r#"
    const path = document.querySelector(
        'svg[data-chart="loss"] path.series[data-name="loss_laion"][data-rank="0"]');
    return path ? JSON.parse(path.getAttribute('data-points')) : null;
"#;

/// How many pieces the loss curve's path is drawn in (a restart breaks it).
const LOSS_PIECES: &str = r#"
    const path = document.querySelector(
        'svg[data-chart="loss"] path.series[data-name="loss_laion"][data-rank="0"]');
    return path ? (path.getAttribute('d').match(/M/g) || []).length : 0;
"#;

fn dom_loss(driver: &Driver) -> Vec<(u64, f64)> {
    step_values(&driver.run(LOSS_POINTS))
}

/// `[[step, value], …]` as the page gives it (none when not an array).
fn step_values(points: &Value) -> Vec<(u64, f64)> {
    points
        .as_array()
        .into_iter()
        .flatten()
        .map(|point| {
            (
                point[0].as_u64().expect("a step"),
                point[1].as_f64().expect("a value"),
            )
        })
        .collect()
}

/// GET with the dashboard's token (agents' `/metrics` ignore it).
fn http_get(url: &str) -> String {
    ureq::get(url)
        .set(
            "Authorization",
            &format!("Bearer {}", flamingo_tests::dashboard_token()),
        )
        .timeout(Duration::from_secs(10))
        .call()
        .unwrap_or_else(|error| panic!("GET {url}: {error}"))
        .into_string()
        .expect("WebDriver or HTTP call")
}

/// `flamingoctl metrics JOB --json`: rank 0's `loss_laion` by step.
fn exported_loss(dir: &Path, coordinator: &str, job: &str) -> Vec<(u64, f64)> {
    exported(dir, coordinator, job, "loss_laion")
}

/// `flamingoctl metrics JOB --json`: rank 0's `name` by step.
fn exported(dir: &Path, coordinator: &str, job: &str, name: &str) -> Vec<(u64, f64)> {
    let text = flamingoctl(
        dir,
        &["--coordinator", coordinator, "metrics", job, "--json"],
    );
    let points: Vec<Value> = serde_json::from_str(&text).expect("a JSON response");
    points
        .iter()
        .filter(|point| point["rank"] == 0)
        .filter_map(|point| Some((point["step"].as_u64()?, point["values"][name].as_f64()?)))
        .collect()
}

/// The kinds of events a job's list may hold: rare, meaningful ones
/// (`samples_skipped` only for an unusual skip rate, never per sample).
const RARE_EVENTS: [&str; 12] = [
    "submitted",
    "scheduled",
    "rank_started",
    "rank_exited",
    "restart",
    "preempted",
    "grow",
    "checkpoint",
    "node_lost",
    "finished",
    "eval",
    "samples_skipped",
];

/// Runs a job over flawed shards and checks what the job page says about
/// its skipped samples: the events list holds only rare kinds, the data
/// chart's skip rates equal `flamingoctl metrics --json`, and the table of
/// reasons holds the counts the data pipeline itself finds for the batches
/// the job read (its own walk of the same spec, seed and batch size),
/// with example keys. Screenshots of the job page, the jobs list and the
/// compare view go to the test artifacts.
fn check_skipped_samples(
    driver: &Driver,
    dir: &Path,
    coordinator: &str,
    dashboard: &str,
    first: &str,
) {
    const STEPS: u64 = 32;
    const LAION_PER_RANK: u64 = 4;
    const MMC4_PER_RANK: u64 = 2;
    for (form, samples, per_shard, size, flawed) in [
        ("mmc4", "120", "60", "96", "0.3"),
        ("laion", "128", "64", "32", "0.1"),
    ] {
        flamingoctl(
            dir,
            &[
                "data",
                "synth",
                "--form",
                form,
                "--out",
                &format!("flawed-{form}"),
                "--samples",
                samples,
                "--per-shard",
                per_shard,
                "--image-size",
                size,
                "--flawed",
                flawed,
                "--seed",
                "5",
            ],
        );
    }
    let job = flamingoctl(
        dir,
        &[
            "--coordinator",
            coordinator,
            "launch",
            "--nodes",
            "2",
            "--slots-per-node",
            "1",
            "--name",
            "flawed-data",
            "--model",
            "tiny/model.toml",
            "--laion_shards",
            "flawed-laion/laion-{00000..00001}.tar",
            "--mmc4_shards",
            "flawed-mmc4/mmc4-{00000..00001}.tar",
            "--batch_size_laion",
            &LAION_PER_RANK.to_string(),
            "--batch_size_mmc4",
            &MMC4_PER_RANK.to_string(),
            "--train_num_samples_laion",
            &(STEPS * LAION_PER_RANK * WORLD).to_string(),
            "--train_num_samples_mmc4",
            &(STEPS * MMC4_PER_RANK * WORLD).to_string(),
            "--num_epochs",
            "1",
            "--logging_steps",
            "4",
            "--audit_samples",
            "--runs_dir",
            "runs",
        ],
    )
    .trim()
    .to_string();
    let finished = wait_for("the flawed-data job", Duration::from_secs(300), || {
        let status = flamingoctl(dir, &["--coordinator", coordinator, "status", &job]);
        (status.contains("Succeeded") || status.contains("Failed")).then_some(status)
    });
    assert!(finished.contains("Succeeded"), "{finished}");

    // What the pipeline itself skips in the batches the job read: the same
    // spec the job's flags and model give, walked batch by batch.
    let mut expected: std::collections::BTreeMap<(String, String), u64> = Default::default();
    for (form, per_rank) in [("laion", LAION_PER_RANK), ("mmc4", MMC4_PER_RANK)] {
        let spec = format!(
            "dataset = \"{form}\"\nshards = \"flawed-{form}/{form}-{{00000..00001}}.tar\"\n\
             tokenizer = \"tiny/lm\"\nimage_size = 32\ndrop_last = true\n"
        );
        let spec = flamingo_data::spec::DataSpec::from_toml(&spec, Some(dir))
            .expect("the flawed-data check");
        // (On a thread of its own: this runs inside the test's runtime.)
        let keys = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    tokio::runtime::Runtime::new()
                        .expect("the flawed-data check")
                        .block_on(async {
                            let storage = flamingo_data::store::Storage::default();
                            let dataset = flamingo_data::reader::Dataset::open(&spec, &storage)
                                .await
                                .expect("the flawed-data check");
                            let preparer = flamingo_data::prepare::Preparer::new(&spec)
                                .expect("the flawed-data check");
                            let pool = std::sync::Arc::new(
                                rayon::ThreadPoolBuilder::new()
                                    .num_threads(2)
                                    .build()
                                    .expect("the flawed-data check"),
                            );
                            let assembler = flamingo_data::batch::Assembler::new(
                                dataset,
                                std::sync::Arc::new(preparer),
                                pool,
                                42,
                            );
                            let mut cursor = flamingo_data::batch::Cursor::default();
                            let mut keys = Vec::new();
                            for _ in 0..STEPS {
                                let batch = assembler
                                    .batch(cursor, (per_rank * WORLD) as usize)
                                    .await
                                    .expect("the flawed-data check");
                                for skip in &batch.skipped {
                                    *expected
                                        .entry((
                                            form.to_string(),
                                            skip.reject.reason.as_str().to_string(),
                                        ))
                                        .or_default() += 1;
                                }
                                keys.extend(batch.samples.iter().map(|sample| sample.key.clone()));
                                cursor = batch.next;
                            }
                            keys
                        })
                })
                .join()
                .expect("the flawed-data check")
        });
        // The walk is the job's: the samples it accepted are those the
        // ranks trained on (their audit), in order.
        let mut audited: Vec<(u64, u64, String)> = Vec::new();
        for rank in 0..WORLD {
            let audit = std::fs::read_to_string(
                dir.join("runs/flawed-data")
                    .join("audit")
                    .join(format!("rank-{rank}.jsonl")),
            )
            .expect("the flawed-data check");
            for line in audit.lines() {
                let line: Value = serde_json::from_str(line).expect("the flawed-data check");
                if line["dataset"] != form {
                    continue;
                }
                let step = line["step"].as_u64().expect("the flawed-data check");
                for key in line["keys"].as_array().expect("the flawed-data check") {
                    audited.push((
                        step,
                        rank,
                        key.as_str().expect("the flawed-data check").to_string(),
                    ));
                }
            }
        }
        audited.sort_by_key(|(step, rank, _)| (*step, *rank));
        let audited: Vec<String> = audited.into_iter().map(|(_, _, key)| key).collect();
        assert_eq!(audited, keys, "{form}: the walk reads what the job read");
    }
    let mmc4_skipped: u64 = expected
        .iter()
        .filter(|((form, _), _)| form == "mmc4")
        .map(|(_, count)| count)
        .sum();
    let mmc4_read = mmc4_skipped + STEPS * MMC4_PER_RANK * WORLD;
    assert!(
        (0.15..0.45).contains(&(mmc4_skipped as f64 / mmc4_read as f64)),
        "about 30% of MMC4 documents rejected: {mmc4_skipped} of {mmc4_read}"
    );

    let page = format!("{dashboard}?job={job}&smoothing=0");
    driver.open(&page);
    let table = wait_for("the table of skip reasons", Duration::from_secs(30), || {
        let rows = driver.run(
            "return [...document.querySelectorAll('#card-skipped table.skips tbody tr')].map(r => \
               [r.dataset.dataset, r.dataset.reason, Number(r.dataset.count), r.querySelectorAll('td.examples div').length])",
        );
        (rows.as_array().is_some_and(|rows| !rows.is_empty())).then_some(rows)
    });
    let mut shown: std::collections::BTreeMap<(String, String), u64> = Default::default();
    for row in table.as_array().expect("the flawed-data check") {
        let examples = row[3].as_u64().expect("the flawed-data check");
        let count = row[2].as_u64().expect("the flawed-data check");
        assert!(
            examples >= 1 && examples <= count.min(5),
            "a few example keys per reason: {row}"
        );
        shown.insert(
            (
                row[0].as_str().expect("the flawed-data check").to_string(),
                row[1].as_str().expect("the flawed-data check").to_string(),
            ),
            count,
        );
    }
    assert_eq!(shown, expected, "the table's counts are the pipeline's");
    let reasons: std::collections::BTreeSet<&str> =
        expected.keys().map(|(_, reason)| reason.as_str()).collect();
    assert!(
        [
            "no_images",
            "bad_base64",
            "bad_json",
            "missing_text",
            "bad_image"
        ]
        .iter()
        .filter(|reason| reasons.contains(*reason))
        .count()
            >= 4,
        "the flawed shards meet most reasons: {reasons:?}"
    );

    // The data chart: each dataset's skip rate, a point per step, as
    // `flamingoctl metrics --json` has it.
    for name in ["skip_rate_laion", "skip_rate_mmc4"] {
        let points = driver.run(&format!(
            "const p = document.querySelector('svg[data-chart=\"skipped\"] path.series[data-name=\"{name}\"]'); \
             return p ? JSON.parse(p.dataset.points) : []"
        ));
        let points = step_values(&points);
        let stored = exported(dir, coordinator, &job, name);
        assert_eq!(points.len() as u64, STEPS, "{name}: a point per step");
        assert_eq!(points, stored, "{name}: the chart holds the stored values");
    }

    // The events list: rare kinds only, no event per skipped sample.
    let kinds = driver.run(
        "return [...document.querySelectorAll('#events li')].map(li => [li.dataset.kind, li.textContent])",
    );
    let kinds = kinds.as_array().expect("the flawed-data check");
    assert!(kinds.len() < 20, "a handful of events: {kinds:?}");
    for kind in kinds {
        let (name, text) = (
            kind[0].as_str().expect("the flawed-data check"),
            kind[1].as_str().expect("the flawed-data check"),
        );
        assert!(RARE_EVENTS.contains(&name), "{name}: {text}");
        if name == "samples_skipped" {
            assert!(text.contains("over twice the recent median"), "{text}");
        }
    }
    driver.screenshot(&artifact("dashboard-flawed-data.png"));

    // The jobs list with both jobs, and the two overlaid.
    driver.open(dashboard);
    wait_for("both jobs listed", Duration::from_secs(30), || {
        let rows = driver.run("return document.querySelectorAll('tr[data-job]').length");
        (rows.as_u64() >= Some(2)).then_some(())
    });
    driver.screenshot(&artifact("dashboard-jobs.png"));
    driver.open(&format!("{dashboard}?job={first},{job}&smoothing=0.6"));
    wait_for("the compare view", Duration::from_secs(30), || {
        let jobs = driver.run(
            "return new Set([...document.querySelectorAll('svg[data-chart=\"loss\"] path.series')].map(p => p.dataset.job)).size",
        );
        (jobs.as_u64() == Some(2)).then_some(())
    });
    driver.screenshot(&artifact("dashboard-compare.png"));
}

/// Scores (step, shots, mean) of the checkpoints `evaluate_checkpoints` ran.
type Evaluated = Vec<(u64, u64, f64)>;

/// Evaluates the job's oldest kept checkpoint with `flamingoctl eval --job`
/// and its latest with `launch --job eval` on both nodes; returns the
/// scores the results files hold, after checking that the coordinator
/// stored the same.
fn evaluate_checkpoints(dir: &Path, coordinator: &str, job: &str, dashboard: &str) -> Evaluated {
    synth_eval(dir, "coco", "8", "4");
    let flags = [
        "--dataset",
        "coco",
        "--data-dir",
        "coco",
        "--shots",
        "0",
        "2",
        "--trials",
        "2",
        "--batch-size",
        "2",
    ];
    // The checkpoints the retention policy kept.
    let record: Value = serde_json::from_str(&http_get(&format!("{dashboard}api/jobs/{job}")))
        .expect("the job as JSON");
    let mut kept: Vec<u64> = record["checkpoints"]
        .as_array()
        .expect("an array")
        .iter()
        .map(|c| c["step"].as_u64().expect("a count"))
        .collect();
    kept.sort();
    assert!(kept.len() >= 2, "{record}");
    let (earlier, latest) = (kept[0], kept[kept.len() - 1]);
    let earlier_text = earlier.to_string();
    let mut direct = vec![
        "--coordinator",
        coordinator,
        "eval",
        "--job",
        job,
        "--step",
        &earlier_text,
        "--results",
        "earlier.json",
    ];
    direct.extend(flags);
    flamingoctl(dir, &direct);
    let mut launched = vec![
        "--coordinator",
        coordinator,
        "launch",
        "--nodes",
        "2",
        "--slots-per-node",
        "1",
        "--job",
        "eval",
        "--wait",
        "--",
        "--job",
        job,
        "--results",
        "latest.json",
    ];
    launched.extend(flags);
    flamingoctl(dir, &launched);

    let mut evaluated = Vec::new();
    for (step, file) in [(earlier, "earlier.json"), (latest, "latest.json")] {
        let results: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(file)).expect("the results file"),
        )
        .expect("results JSON");
        for entry in results["coco"].as_array().expect("an array") {
            evaluated.push((
                step,
                entry["shots"].as_u64().expect("a count"),
                entry["mean"].as_f64().expect("a score"),
            ));
        }
    }
    assert_eq!(evaluated.len(), 4, "two checkpoints, two shot counts");
    let stored: Value =
        serde_json::from_str(&http_get(&format!("{dashboard}api/jobs/{job}/evals")))
            .expect("the evals as JSON");
    let stored: Evaluated = stored["evals"]
        .as_array()
        .expect("an array")
        .iter()
        .flat_map(|record| {
            assert_eq!(record["dataset"], "coco");
            assert_eq!(record["metric"], "CIDEr");
            assert_eq!(record["selection"], "random");
            assert_eq!(record["samples"], 4);
            let step = record["step"].as_u64().expect("a count");
            record["scores"]
                .as_array()
                .expect("an array")
                .iter()
                .map(|score| {
                    assert_eq!(score["trials"].as_array().expect("an array").len(), 2);
                    (
                        step,
                        score["shots"].as_u64().expect("a count"),
                        score["mean"].as_f64().expect("a score"),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(
        stored, evaluated,
        "the coordinator holds the results files' scores"
    );
    // The CLI lists the same scores.
    let listed: Value = serde_json::from_str(&flamingoctl(
        dir,
        &["--coordinator", coordinator, "--json", "evals", job],
    ))
    .expect("evals as JSON");
    let listed: Evaluated = listed
        .as_array()
        .expect("an array")
        .iter()
        .flat_map(|report| {
            let step = report["step"].as_u64().expect("a step");
            report["scores"]
                .as_array()
                .expect("an array")
                .iter()
                .map(move |score| {
                    (
                        step,
                        score["shots"].as_u64().expect("a count"),
                        score["mean"].as_f64().expect("a score"),
                    )
                })
        })
        .collect();
    assert_eq!(listed, evaluated, "flamingoctl evals");
    let table = flamingoctl(dir, &["--coordinator", coordinator, "evals", job]);
    assert!(table.contains("CIDEr"), "{table}");
    evaluated
}

/// The page shows the eval scores: a COCO chart with a dot per checkpoint
/// and shot count, a table of the same values, and the evaluated steps
/// marked on the loss chart.
fn check_eval_charts(driver: &Driver, evaluated: &Evaluated) {
    let dots = wait_for("the eval chart", Duration::from_secs(30), || {
        let dots = driver.run(
            "return [...document.querySelectorAll('svg[data-chart=\"eval-coco-cider-random\"] circle.dot')].map(c => [Number(c.dataset.step), Number(c.dataset.value)])",
        );
        (dots.as_array().is_some_and(|d| d.len() == evaluated.len())).then_some(dots)
    });
    let mut shown = step_values(&dots);
    let mut want: Vec<(u64, f64)> = evaluated
        .iter()
        .map(|(step, _, mean)| (*step, *mean))
        .collect();
    let order = |a: &(u64, f64), b: &(u64, f64)| a.partial_cmp(b).expect("no NaN scores");
    shown.sort_by(order);
    want.sort_by(order);
    assert_eq!(shown, want);
    let cells = driver.run(
        "return [...document.querySelectorAll('table.evals tbody td[data-shots]')].map(td => [Number(td.parentElement.dataset.step), Number(td.dataset.shots), Number(td.dataset.mean)])",
    );
    let mut cells: Evaluated = cells
        .as_array()
        .expect("an array")
        .iter()
        .map(|c| {
            (
                c[0].as_u64().expect("a count"),
                c[1].as_u64().expect("a count"),
                c[2].as_f64().expect("a score"),
            )
        })
        .collect();
    cells.sort_by(|a, b| a.partial_cmp(b).expect("no NaN scores"));
    let mut want = evaluated.clone();
    want.sort_by(|a, b| a.partial_cmp(b).expect("no NaN scores"));
    assert_eq!(cells, want, "the table holds every score");
    let marked = driver.run(
        "return [...document.querySelectorAll('svg[data-chart=\"loss\"] line.event[data-kind=\"eval\"]')].map(l => Number(l.dataset.x))",
    );
    let mut steps: Vec<u64> = evaluated.iter().map(|(step, _, _)| *step).collect();
    steps.dedup();
    assert_eq!(
        marked,
        json!(steps),
        "the evaluated steps are marked on the loss chart"
    );
    assert_eq!(
        driver.run("return document.getElementById('card-eval').hidden"),
        json!(true),
        "the placeholder gives way to the benchmark's card"
    );
}

fn artifact(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/test-artifacts")
        .join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_running_jobs_curves_as_stored() {
    // Every process the sandbox starts (and the ranks its agents start)
    // exports spans here. Set before any thread of this test binary reads
    // the environment.
    let collector = Collector::default();
    let otlp = collector.start();
    // SAFETY: this test binary has one test, and no other thread runs yet.
    unsafe { std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp) };
    let mut sandbox = ClusterSandbox::start(SandboxOptions {
        nodes: 2,
        slots_per_node: 1,
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    let dir = sandbox.path().join("work");
    std::fs::create_dir_all(&dir).unwrap();
    let coordinator = sandbox.coordinator_endpoint();
    flamingoctl(
        &dir,
        &[
            "data",
            "synth",
            "--form",
            "laion",
            "--out",
            "data",
            "--samples",
            "512",
            "--per-shard",
            "128",
            "--image-size",
            "32",
        ],
    );
    flamingoctl(
        &dir,
        &[
            "tiny-model",
            "--tokenizer",
            "data/tokenizer",
            "--out",
            "tiny",
        ],
    );
    let job = flamingoctl(
        &dir,
        &[
            "--coordinator",
            &coordinator,
            "launch",
            "--nodes",
            "2",
            "--slots-per-node",
            "1",
            "--name",
            "dashboard",
            "--model",
            "tiny/model.toml",
            "--laion_shards",
            "data/laion-{00000..00003}.tar",
            "--batch_size_laion",
            &PER_RANK.to_string(),
            "--train_num_samples_laion",
            &SAMPLES.to_string(),
            "--num_epochs",
            &EPOCHS.to_string(),
            "--learning_rate",
            "2e-3",
            "--warmup_steps",
            "10",
            "--logging_steps",
            "8",
            "--checkpoint_steps",
            "40",
            "--runs_dir",
            "runs",
            "--max-restarts",
            "2",
            "--env",
            &format!("FLAMINGO_FAULT=before-commit:{CRASH_STEP}"),
        ],
    )
    .trim()
    .to_string();

    let profile = tempfile::tempdir().unwrap();
    let driver = Driver::start(profile.path());
    // Signed in once, as a user following `flamingoctl up`'s link.
    driver.open(&format!(
        "{}login?token={}",
        sandbox.dashboard(),
        flamingo_tests::dashboard_token()
    ));
    let page = format!("{}?job={job}&smoothing=0", sandbox.dashboard());
    driver.open(&page);
    let first = wait_for(
        "the loss chart's first points",
        Duration::from_secs(180),
        || {
            let points = dom_loss(&driver);
            (points.len() >= 3).then_some(points)
        },
    );
    assert!(
        (first.len() as u64) < STEPS,
        "the job should still be running (it has {STEPS} steps; {} shown)",
        first.len()
    );

    // Prometheus while the job runs: the coordinator's jobs and last loss,
    // the agent's rank processes.
    let prometheus = http_get(&format!("{}metrics", sandbox.dashboard()));
    assert!(
        prometheus.contains("flamingo_jobs{state=\"running\"} 1"),
        "{prometheus}"
    );
    assert!(
        prometheus.contains(&format!(
            "flamingo_job_last_value{{job=\"{job}\",metric=\"loss_laion\"}}"
        )),
        "{prometheus}"
    );
    let agent = http_get(&sandbox.agent_metrics("node-0").unwrap());
    assert!(
        agent.contains(&format!(
            "flamingo_agent_rank_running{{node=\"node-0\",job=\"{job}\",attempt=\"0\",rank=\"0\""
        )),
        "{agent}"
    );

    // The chart grows as steps arrive (the page refreshes itself).
    wait_for("the loss chart to grow", Duration::from_secs(60), || {
        (dom_loss(&driver).len() > first.len()).then_some(())
    });

    let finished = wait_for("the job to finish", Duration::from_secs(300), || {
        let status = flamingoctl(&dir, &["--coordinator", &coordinator, "status", &job]);
        (status.contains("Succeeded") || status.contains("Failed")).then_some(status)
    });
    assert!(finished.contains("Succeeded"), "{finished}");

    // Two checkpoints evaluated on a COCO-style benchmark: the older by
    // `flamingoctl eval` here, the latest by a 2-rank eval job. Both store
    // their scores with the training job.
    let evaluated = evaluate_checkpoints(&dir, &coordinator, &job, &sandbox.dashboard());

    // Reloaded after the end, the chart holds what `flamingoctl metrics`
    // exports: every step (the restart's rewound steps twice), the same
    // values.
    driver.open(&page);
    let exported = exported_loss(&dir, &coordinator, &job);
    let steps: std::collections::BTreeSet<u64> = exported.iter().map(|(step, _)| *step).collect();
    assert_eq!(
        steps,
        (1..=STEPS).collect(),
        "a loss for every step was stored"
    );
    assert!(
        exported.len() as u64 > STEPS,
        "the steps after the resume point ran twice"
    );
    let shown = wait_for("the finished job's chart", Duration::from_secs(30), || {
        let points = dom_loss(&driver);
        (points.len() == exported.len()).then_some(points)
    });
    assert_eq!(shown, exported);
    let checkpoints = driver.run(
        "return document.querySelectorAll('svg[data-chart=\"loss\"] line.event[data-kind=\"checkpoint\"]').length",
    );
    assert!(
        checkpoints.as_u64().unwrap() >= STEPS / 40,
        "checkpoints marked on the timeline: {checkpoints}"
    );
    let restarts = driver.run(
        "return [...document.querySelectorAll('svg[data-chart=\"loss\"] line.event[data-kind=\"restart\"]')].map(l => l.dataset.x)",
    );
    assert_eq!(
        restarts,
        json!(["40"]),
        "the restart is marked where the new attempt resumes"
    );
    assert_eq!(
        driver.run(LOSS_PIECES),
        json!(2),
        "the curve breaks where the restart rewinds"
    );
    let ranks = driver.run(
        "return [...document.querySelectorAll('svg[data-chart=\"step_time\"] path.series')].map(p => p.dataset.rank)",
    );
    assert_eq!(ranks, json!(["0", "1"]), "a step-time curve per rank");
    // Skipped samples are a series (a point per step), not events.
    let skipped = driver.run(
        "const p = document.querySelector('svg[data-chart=\"skipped\"] path.series[data-name=\"skip_rate_laion\"]'); \
         return p ? JSON.parse(p.dataset.points).length : 0",
    );
    assert_eq!(
        skipped.as_u64(),
        Some(exported.len() as u64),
        "a skip_rate_laion point per step"
    );
    // One unit per chart (one y axis): samples/s and tokens/s apart.
    let units = driver.run(
        "const out = {}; for (const svg of document.querySelectorAll('svg[data-chart]')) { \
           const units = [...new Set([...svg.querySelectorAll('path.series')].map(p => p.dataset.unit))]; \
           if (units.length) out[svg.dataset.chart] = units; } return out",
    );
    let units = units.as_object().expect("charts");
    assert!(
        units.contains_key("samples_per_second") && units.contains_key("tokens_per_second"),
        "{units:?}"
    );
    for (chart, list) in units {
        let list = list.as_array().expect("units");
        assert!(
            list.len() == 1 && list[0] != "unknown",
            "chart {chart} mixes units or has none: {list:?}"
        );
    }
    check_eval_charts(&driver, &evaluated);
    driver.screenshot(&artifact("dashboard.png"));

    // The coordinator dies (SIGKILL) and comes back: the curves are intact.
    sandbox.kill_coordinator();
    sandbox.start_coordinator().unwrap();
    driver.open(&page);
    let after = wait_for(
        "the chart after a coordinator restart",
        Duration::from_secs(30),
        || {
            let points = dom_loss(&driver);
            (points.len() == exported.len()).then_some(points)
        },
    );
    assert_eq!(after, exported);
    assert_eq!(exported_loss(&dir, &coordinator, &job), exported);
    let api = http_get(&format!(
        "{}api/jobs/{job}/series?names=step_seconds",
        sandbox.dashboard()
    ));
    let api: Value = serde_json::from_str(&api).unwrap();
    for series in api["series"].as_array().unwrap() {
        assert!(
            series["total"].as_u64().unwrap() >= STEPS,
            "every step of rank {} reported: {}",
            series["rank"],
            series["total"]
        );
    }
    let stored: Value = serde_json::from_str(&http_get(&format!(
        "{}api/jobs/{job}/evals",
        sandbox.dashboard()
    )))
    .unwrap();
    assert_eq!(
        stored["evals"].as_array().unwrap().len(),
        2,
        "the eval scores outlive the coordinator: {stored}"
    );
    check_eval_charts(&driver, &evaluated);
    driver.screenshot(&artifact("dashboard-after-coordinator-restart.png"));

    // The jobs list shows the job and its state, and links to its page.
    driver.open(&sandbox.dashboard());
    let row = format!(
        "const row = document.querySelector('tr[data-job=\"{job}\"]'); \
         return row ? [row.querySelector('td.state').textContent, row.querySelector('a').getAttribute('href')] : null"
    );
    let listed = wait_for("the jobs list", Duration::from_secs(30), || {
        let value = driver.run(&row);
        (!value.is_null()).then_some(value)
    });
    assert_eq!(listed, json!(["Succeeded", format!("/?job={job}")]));

    // A second job over MMC4 shards of which about 30% of the documents
    // are rejected (and LAION with a few broken pairs), as crawls are.
    check_skipped_samples(&driver, &dir, &coordinator, &sandbox.dashboard(), &job);

    // TensorBoard reads the event files `flamingoctl metrics --tensorboard`
    // writes (its own reader, from the tensorboard package).
    flamingoctl(
        &dir,
        &[
            "--coordinator",
            &coordinator,
            "metrics",
            &job,
            "--tensorboard",
            "tb",
        ],
    );
    let scalars = tensorboard_scalars(&dir.join("tb").join(&job).join("rank-0"));
    // Read without TensorBoard's purge of abandoned steps, the file holds
    // every stored point in order.
    let loss: Vec<(u64, f64)> = scalars["train/loss_laion"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
        .collect();
    assert_eq!(loss.len(), exported.len());
    for ((step, value), (want_step, want)) in loss.iter().zip(&exported) {
        assert_eq!(step, want_step);
        // Scalars are stored as 32-bit floats.
        assert_eq!(*value as f32, *want as f32, "step {step}");
    }
    assert_eq!(
        scalars["step_seconds"].as_array().unwrap().len(),
        exported.len(),
        "rank 0 measured every step it ran"
    );
    // The eval scores are a run of their own: per shot count, a scalar at
    // each evaluated step.
    let scalars = tensorboard_scalars(&dir.join("tb").join(&job).join("eval"));
    let mut from_tensorboard: Vec<(u64, u64, f32)> = Vec::new();
    for (tag, points) in scalars.as_object().unwrap() {
        let shots: u64 = tag
            .strip_prefix("eval/coco/")
            .and_then(|rest| rest.strip_suffix("_shots"))
            .unwrap_or_else(|| panic!("unexpected tag {tag}"))
            .parse()
            .unwrap();
        for point in points.as_array().unwrap() {
            let step = point[0].as_u64().unwrap();
            from_tensorboard.push((step, shots, point[1].as_f64().unwrap() as f32));
        }
    }
    from_tensorboard.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut want: Vec<(u64, u64, f32)> = evaluated
        .iter()
        .map(|(step, shots, mean)| (*step, *shots, *mean as f32))
        .collect();
    want.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert_eq!(from_tensorboard, want, "TensorBoard's eval run");

    // The spans the processes exported over OTLP.
    let spans = wait_for("the spans", Duration::from_secs(30), || {
        let spans = collector.spans();
        let has =
            |service: &str, name: &str| spans.iter().any(|(s, n, _)| s == service && n == name);
        (has("flamingo-coordinator", "launch")
            && has("flamingo-coordinator", "checkpoint")
            && has("flamingo-coordinator", "restart")
            && has("flamingo-rank", "rendezvous")
            && has("flamingo-rank", "checkpoint"))
        .then_some(spans)
    });
    let attribute = |name: &str, key: &str| {
        spans
            .iter()
            .filter(|(service, span, _)| service == "flamingo-coordinator" && span == name)
            .flat_map(|(_, _, attributes)| attributes.iter())
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    assert!(attribute("launch", "job").contains(&job), "{spans:?}");
    assert!(attribute("checkpoint", "step").contains(&"40".to_string()));
    let causes = attribute("restart", "cause");
    assert!(
        causes.iter().any(|cause| cause.contains("rank 0")),
        "{causes:?}"
    );
}

/// A TensorBoard run's scalars, read by TensorBoard's own reader:
/// `{tag: [[step, value], ...]}`.
fn tensorboard_scalars(run: &Path) -> Value {
    let read = Command::new(flamingo_common::testing::venv_bin("python"))
        .args(["-c", TENSORBOARD_READ])
        .arg(run)
        .output()
        .expect("python runs");
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    serde_json::from_slice(&read.stdout).expect("the reader prints JSON")
}

const TENSORBOARD_READ: &str = r#"
import json, sys
from tensorboard.backend.event_processing import event_accumulator as ea
acc = ea.EventAccumulator(sys.argv[1], size_guidance={ea.SCALARS: 0}, purge_orphaned_data=False)
acc.Reload()
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
"#;
