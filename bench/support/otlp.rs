//! A local OTLP/HTTP receiver for benchmarks that export spans: accepts every
//! export request and counts what it got, so export costs what it would against
//! a collector on the same host.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct Receiver {
    pub port: u16,
    requests: Arc<AtomicU64>,
}

impl Receiver {
    pub fn start() -> Result<Receiver, String> {
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(|err| format!("cannot start the OTLP receiver: {err}"))?;
        let port = listener.local_addr().map_err(|err| err.to_string())?.port();
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let counter = counter.clone();
                std::thread::spawn(move || serve(stream, &counter));
            }
        });
        Ok(Receiver { port, requests })
    }

    /// Export requests received (each a batch of spans).
    pub fn batches(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// Answers HTTP/1.1 requests on one kept-alive connection with 200.
fn serve(stream: TcpStream, requests: &AtomicU64) {
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        let mut first = true;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" && !first {
                break;
            }
            first = false;
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        requests.fetch_add(1, Ordering::Relaxed);
        let response = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}
