//! Outages of real services, as their clients see them: a TCP forwarder in front of the
//! service (Postgres, Redis, the S3 server, ...) that a test takes down — its port refuses
//! new connections and the open ones are cut — and brings back on the same port. It runs
//! on a runtime of its own, so a test may block while it forwards.

use std::net::SocketAddr;
use std::sync::Mutex;

use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

pub(crate) struct Outage {
    pub(crate) port: u16,
    target: SocketAddr,
    rt: Option<Runtime>,
    /// Cancels the accept loop and every forwarded connection; `None` while down.
    up: Mutex<Option<CancellationToken>>,
}

impl Outage {
    /// A forwarder to `target` (`127.0.0.1:5432`), up.
    pub(crate) fn start(target: &str) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let o = Outage {
            port: listener.local_addr().unwrap().port(),
            target: target.parse().unwrap(),
            rt: Some(rt),
            up: Mutex::new(None),
        };
        o.serve(listener);
        o
    }

    /// `host:port` of the forwarder.
    pub(crate) fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn serve(&self, listener: std::net::TcpListener) {
        let rt = self.rt.as_ref().expect("running");
        listener.set_nonblocking(true).unwrap();
        let listener = {
            let _in_rt = rt.enter();
            TcpListener::from_std(listener).unwrap()
        };
        let token = CancellationToken::new();
        let (target, t) = (self.target, token.clone());
        rt.spawn(async move {
            loop {
                let conn = tokio::select! {
                    _ = t.cancelled() => return,
                    c = listener.accept() => c,
                };
                let Ok((mut client, _)) = conn else { continue };
                let t = t.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = t.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        *self.up.lock().unwrap() = Some(token);
    }

    /// The service goes away: new connections are refused, open ones are cut.
    pub(crate) fn down(&self) {
        if let Some(t) = self.up.lock().unwrap().take() {
            t.cancel();
        }
    }

    /// The service is back, on the same port.
    pub(crate) fn up(&self) {
        let listener = loop {
            match std::net::TcpListener::bind(("127.0.0.1", self.port)) {
                Ok(l) => break l,
                // the old listener's task may not have dropped it yet
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        };
        self.serve(listener);
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        self.down();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
