//! Where `http.request` sends a request it has built and checked: the network
//! through the VM's HTTP client, or, under `agent-block test`, the test's
//! routes. Everything before (arguments, `--http-allow`, the body's encoding,
//! trace headers) and after (the response table, error tables) is the same code.

use futures::future::LocalBoxFuture;
use reqwest::header::HeaderMap;

/// A response within `--http-max-body`.
pub struct HttpResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// A call that got no response: raised as `{ code, message }` with the method
/// and URL put in front of `message`.
pub struct HttpFailure {
    pub code: u16,
    pub message: String,
}

pub trait HttpExchange {
    fn exchange(
        &self,
        request: reqwest::Request,
        max_body: usize,
    ) -> LocalBoxFuture<'static, Result<HttpResponse, HttpFailure>>;
}

/// The network, through one VM's client.
pub struct Network(pub reqwest::Client);

impl HttpExchange for Network {
    fn exchange(
        &self,
        request: reqwest::Request,
        max_body: usize,
    ) -> LocalBoxFuture<'static, Result<HttpResponse, HttpFailure>> {
        Box::pin(send(self.0.clone(), request, max_body))
    }
}

async fn send(
    client: reqwest::Client,
    request: reqwest::Request,
    max_body: usize,
) -> Result<HttpResponse, HttpFailure> {
    let mut response = client.execute(request).await.map_err(transport_failure)?;
    let too_large = || too_large(max_body);
    if response.content_length().is_some_and(|length| length > max_body as u64) {
        return Err(too_large());
    }
    let status = response.status().as_u16();
    let headers = std::mem::take(response.headers_mut());
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport_failure)? {
        if body.len() + chunk.len() > max_body {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(HttpResponse { status, headers, body })
}

/// A response body over `--http-max-body`.
pub fn too_large(max_body: usize) -> HttpFailure {
    HttpFailure { code: 502, message: format!("the response body is larger than --http-max-body ({max_body} bytes)") }
}

fn transport_failure(err: reqwest::Error) -> HttpFailure {
    let code = if err.is_timeout() { 504 } else { 502 };
    let err = err.without_url();
    let message = if err.is_timeout() { "timed out".to_string() } else { err.to_string() };
    HttpFailure { code, message: crate::report::with_causes(message, std::error::Error::source(&err)) }
}
