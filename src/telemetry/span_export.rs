//! Finished spans on their way to the collector: a bounded queue that handlers'
//! threads push into under a short lock, and one exporter thread that takes the
//! queue whole when a batch is full or the schedule delay has passed, encodes it
//! ([`crate::telemetry::otlp_wire`]) and sends it over OTLP/HTTP or gRPC. A
//! full queue drops the span and counts it (`agent_block_spans_dropped_total`);
//! an unreachable collector only costs the exporter thread its timeouts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder as GrpcEncoder};

use crate::telemetry::otlp_settings::{BatchSettings, ExportSettings, Protocol};
use crate::telemetry::otlp_wire::{Encoder, FinishedSpan};

/// Spans dropped because the queue was full, since start.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Spans dropped because the export queue was full.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// The queue between the handlers and the exporter thread.
pub struct SpanQueue {
    state: Mutex<Queued>,
    wake: Condvar,
    batch: BatchSettings,
}

struct Queued {
    spans: Vec<FinishedSpan>,
    closing: bool,
}

impl SpanQueue {
    /// Queues a finished span; drops and counts it when the queue is full. Wakes
    /// the exporter only when a batch is complete, so a span costs one
    /// uncontended lock.
    pub fn push(&self, span: FinishedSpan) {
        let mut queued = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if queued.spans.len() >= self.batch.max_queue_size {
            drop(queued);
            if DROPPED.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    max_queue_size = self.batch.max_queue_size,
                    "span export queue full: dropping spans (counted in agent_block_spans_dropped_total)"
                );
            }
            return;
        }
        queued.spans.push(span);
        let complete = queued.spans.len() == self.batch.max_export_batch_size;
        drop(queued);
        if complete {
            self.wake.notify_one();
        }
    }

    /// Waits until a batch is complete, the schedule delay has passed since
    /// `since`, or the queue closes; then takes everything queued.
    fn take(&self, since: Instant, spare: &mut Vec<FinishedSpan>) -> bool {
        let deadline = since + self.batch.schedule_delay;
        let mut queued = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        while !queued.closing && queued.spans.len() < self.batch.max_export_batch_size {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            queued = match self.wake.wait_timeout(queued, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        std::mem::swap(&mut queued.spans, spare);
        queued.closing
    }

    fn close(&self) {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).closing = true;
        self.wake.notify_one();
    }
}

/// The running exporter thread.
pub struct SpanExporter {
    pub queue: Arc<SpanQueue>,
    finished: std::sync::mpsc::Receiver<()>,
}

impl SpanExporter {
    /// Starts the exporter thread with its own small runtime for the transport.
    pub fn start(settings: ExportSettings, encoder: Encoder) -> Result<SpanExporter, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|err| format!("cannot start the span exporter's runtime: {err}"))?;
        let transport = {
            let _entered = runtime.enter();
            Transport::new(&settings)?
        };
        let queue = Arc::new(SpanQueue {
            state: Mutex::new(Queued { spans: Vec::new(), closing: false }),
            wake: Condvar::new(),
            batch: settings.batch,
        });
        let (done, finished) = std::sync::mpsc::channel();
        let exporting = queue.clone();
        std::thread::Builder::new()
            .name("span-export".into())
            .spawn(move || {
                export_loop(&exporting, encoder, transport, &runtime);
                let _ = done.send(());
            })
            .map_err(|err| format!("cannot start the span exporter thread: {err}"))?;
        Ok(SpanExporter { queue, finished })
    }

    /// Exports what is queued and stops the thread, waiting at most `limit`.
    /// Returns false when the thread did not finish in time.
    pub fn shutdown(self, limit: Duration) -> bool {
        self.queue.close();
        self.finished.recv_timeout(limit).is_ok()
    }
}

fn export_loop(queue: &SpanQueue, mut encoder: Encoder, mut transport: Transport, runtime: &tokio::runtime::Runtime) {
    let mut spans = Vec::new();
    let mut last_export = Instant::now();
    let mut failures = 0u64;
    loop {
        let closing = queue.take(last_export, &mut spans);
        last_export = Instant::now();
        for batch in spans.chunks(queue.batch.max_export_batch_size.max(1)) {
            let sent = runtime.block_on(transport.send(encoder.encode(batch)));
            if let Err(err) = sent {
                failures += 1;
                // The first failure, then every hundredth: a collector that is
                // down must not flood the log.
                if failures % 100 == 1 {
                    tracing::warn!(error = %err, spans = batch.len(), failures, "span export failed; these spans are lost");
                }
            }
        }
        spans.clear();
        if closing {
            return;
        }
    }
}

/// Where batches go: OTLP/HTTP with protobuf bodies, or OTLP/gRPC.
enum Transport {
    Http { client: reqwest::Client, url: String, headers: reqwest::header::HeaderMap },
    Grpc { client: tonic::client::Grpc<tonic::transport::Channel>, metadata: tonic::metadata::MetadataMap },
}

const GRPC_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

impl Transport {
    fn new(settings: &ExportSettings) -> Result<Transport, String> {
        let failed = |err: &dyn std::fmt::Display| format!("cannot set up OTLP span export: {err}");
        match settings.protocol {
            Protocol::HttpProtobuf => {
                let mut headers = reqwest::header::HeaderMap::new();
                for (name, value) in &settings.headers {
                    let name = reqwest::header::HeaderName::from_bytes(name.as_bytes()).map_err(|e| failed(&e))?;
                    let value = reqwest::header::HeaderValue::from_str(value).map_err(|e| failed(&e))?;
                    headers.append(name, value);
                }
                headers
                    .insert(reqwest::header::CONTENT_TYPE, "application/x-protobuf".parse().map_err(|e| failed(&e))?);
                let client = reqwest::Client::builder().timeout(settings.timeout).build().map_err(|e| failed(&e))?;
                Ok(Transport::Http { client, url: settings.endpoint.clone(), headers })
            }
            Protocol::Grpc => {
                let channel = tonic::transport::Endpoint::from_shared(settings.endpoint.clone())
                    .map_err(|e| failed(&e))?
                    .timeout(settings.timeout)
                    .connect_timeout(settings.timeout)
                    .connect_lazy();
                let mut metadata = tonic::metadata::MetadataMap::new();
                for (name, value) in &settings.headers {
                    let key = tonic::metadata::MetadataKey::from_bytes(name.to_ascii_lowercase().as_bytes())
                        .map_err(|e| failed(&e))?;
                    metadata.append(key, value.parse().map_err(|e| failed(&e))?);
                }
                Ok(Transport::Grpc { client: tonic::client::Grpc::new(channel), metadata })
            }
        }
    }

    async fn send(&mut self, body: Bytes) -> Result<(), String> {
        match self {
            Transport::Http { client, url, headers } => {
                let response = client
                    .post(url.as_str())
                    .headers(headers.clone())
                    .body(body)
                    .send()
                    .await
                    .map_err(|err| crate::report::chain(&err))?;
                let status = response.status();
                if status.is_success() { Ok(()) } else { Err(format!("the collector answered {status}")) }
            }
            Transport::Grpc { client, metadata } => {
                client.ready().await.map_err(|err| format!("the collector is not reachable: {err}"))?;
                let mut request = tonic::Request::new(body);
                *request.metadata_mut() = metadata.clone();
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(GRPC_EXPORT);
                client.unary::<Bytes, (), _>(request, path, Encoded).await.map_err(|status| status.to_string())?;
                Ok(())
            }
        }
    }
}

/// A gRPC codec for a request already encoded, ignoring the response's body
/// (an `ExportTraceServiceResponse` only reports partial rejections).
#[derive(Clone, Copy)]
struct Encoded;

impl Codec for Encoded {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = Encoded;
    type Decoder = Encoded;

    fn encoder(&mut self) -> Self::Encoder {
        Encoded
    }

    fn decoder(&mut self) -> Self::Decoder {
        Encoded
    }
}

impl GrpcEncoder for Encoded {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Encoded {
    type Item = ();
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}
