//! A `redis-server` started by a test on a loopback port (the cluster tests' store, the TCP
//! tunnel tests' upstream).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A `redis-server` of a test, on a loopback port, without persistence; killed on drop.
pub struct Redis {
    pub port: u16,
    child: Child,
}

impl Redis {
    /// Starts one, or `None` (with a loud message) when the binary is missing.
    pub async fn start() -> Option<Self> {
        if Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_err() {
            assert!(
                std::env::var_os("FERRY_CI").is_none(),
                "this test needs redis-server: apt-get install -y redis-server"
            );
            eprintln!("SKIPPED: redis-server is not installed (apt-get install -y redis-server)");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
        Some(Self::start_on(port).await)
    }

    pub async fn start_on(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let redis = Self { port, child };
        redis.wait_ready().await;
        redis
    }

    /// Readiness: the server answers PING.
    async fn wait_ready(&self) {
        loop {
            if let Ok(reply) = self.command("PING\r\n").await
                && reply.starts_with("+PONG")
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends one inline command and returns what came back first.
    pub async fn command(&self, line: &str) -> std::io::Result<String> {
        let mut conn = TcpStream::connect(("127.0.0.1", self.port)).await?;
        conn.write_all(line.as_bytes()).await?;
        let mut buf = vec![0u8; 64 * 1024];
        let n = conn.read(&mut buf).await?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Stops it (SIGKILL) and starts an empty one on the same port.
    pub async fn restart_empty(&mut self) {
        self.stop();
        *self = Self::start_on(self.port).await;
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
