//! The /metrics endpoint (hyper, HTTP/1.1), with TLS and basic auth when a
//! web configuration asks for them.

use std::{convert::Infallible, sync::Arc};

use http_body_util::Full;
use hyper::{
    body::Bytes, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::{
    shared::{lock, State},
    web_config::WebConfig,
};

const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn reply(status: StatusCode, ctype: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = ctype.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn handle<B>(
    req: Request<B>,
    state: State,
    web: Arc<WebConfig>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if web.requires_auth() {
        let header = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        // bcrypt is slow on purpose: off the event loop.
        let w = web.clone();
        let ok = tokio::task::spawn_blocking(move || w.authorized(header.as_deref()))
            .await
            .unwrap_or(false);
        if !ok {
            let mut r = reply(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                "unauthorized\n".into(),
            );
            r.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Basic realm=\"activesync-monitor\""),
            );
            return Ok(r);
        }
    }
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => match lock(&state).metrics_text() {
            Ok(text) => reply(StatusCode::OK, CONTENT_TYPE, text),
            Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("encoding metrics: {e}\n")),
        },
        (&Method::GET, "/") => reply(
            StatusCode::OK,
            "text/html",
            "<html><body><h1>ActiveSync connection monitor</h1><a href=\"/metrics\">metrics</a></body></html>\n".into(),
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics\n".into()),
    })
}

pub async fn serve(listener: TcpListener, state: State, web: WebConfig) {
    let web = Arc::new(web);
    let tls = web.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                log::warn!("accepting a /metrics connection: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (st, web, tls) = (state.clone(), web.clone(), tls.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, st.clone(), web.clone()));
            let served = match tls {
                Some(acceptor) => {
                    // Bounded: a client that never finishes its handshake goes.
                    let hs = tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        acceptor.accept(stream),
                    )
                    .await;
                    match hs {
                        Ok(Ok(s)) => {
                            http1::Builder::new()
                                .serve_connection(TokioIo::new(s), svc)
                                .await
                        }
                        Ok(Err(e)) => {
                            log::debug!("/metrics TLS handshake with {peer}: {e}");
                            return;
                        }
                        Err(_) => {
                            log::debug!("/metrics TLS handshake with {peer}: timed out");
                            return;
                        }
                    }
                }
                None => {
                    http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await
                }
            };
            if let Err(e) = served {
                log::debug!("/metrics connection from {peer}: {e}");
            }
        });
    }
}
