//! Helpers for tests and benchmarks across the workspace (feature
//! `testing`): the test venv's programs, and a real S3-compatible server
//! (moto's server mode) with a bucket.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A program of the test venv (`$FLAMINGO_VENV/bin/<name>`), else `name`
/// on PATH.
pub fn venv_bin(name: &str) -> PathBuf {
    std::env::var_os("FLAMINGO_VENV")
        .map(|venv| PathBuf::from(venv).join("bin").join(name))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Runs the venv's Python on `script` with `args`; panics with the script's
/// stderr when it fails (the parity tests' reference implementations).
pub fn run_python(script: &std::path::Path, args: &[&std::ffi::OsStr]) {
    let output = Command::new(venv_bin("python"))
        .arg(script)
        .args(args)
        .output()
        .expect("the venv's python runs");
    assert!(
        output.status.success(),
        "{}: {}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// moto's S3 server on a free local port, stopped on drop.
pub struct S3Server {
    child: Child,
    pub endpoint: String,
}

impl S3Server {
    /// Starts the server and creates `bucket` through the S3 API itself
    /// (credentials `test`/`test`, region `us-east-1`).
    pub fn start(bucket: &str) -> Self {
        let port = crate::net::free_local_port().expect("a free port");
        let child = Command::new(venv_bin("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server starts (scripts/setup.sh installs it in the venv)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        let endpoint = format!("http://127.0.0.1:{port}");
        let created = Command::new(venv_bin("python"))
            .args([
                "-c",
                &format!(
                    "import boto3; boto3.client('s3', endpoint_url='{endpoint}', region_name='us-east-1', aws_access_key_id='test', aws_secret_access_key='test').create_bucket(Bucket='{bucket}')"
                ),
            ])
            .status()
            .expect("python runs");
        assert!(created.success(), "bucket {bucket} created");
        Self { child, endpoint }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
