use super::Context;
use crate::client::Client;
use anyhow::{Context as _, Result};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::{StreamExt, TryStreamExt};
use shoal_api::seg;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::Semaphore;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  shoal port-forward backend 8080         http://127.0.0.1:8080/… reaches the app backend
  shoal port-forward backend              a free port, printed
  curl http://127.0.0.1:8080/healthz      each request goes to one of its ready replicas

Requests go through the API (a deployer's token is needed), to a ready replica on whichever
node runs it, as another app's call by name would: the app needs no route. `Authorization`
headers are not passed on (the API's token is sent in their place). At most 32 requests go at
once, each on a connection of its own; more wait their turn, so that the API's cap on one
client's connections is left to other commands. Runs until interrupted.")]
pub struct PortForwardArgs {
    /// App name (an http app).
    #[arg(value_parser = crate::commands::object_name)]
    app: String,
    /// Where to listen: PORT on 127.0.0.1, or ADDRESS:PORT (default: a free port on
    /// 127.0.0.1, printed).
    #[arg(value_parser = local_address, default_value = "127.0.0.1:0")]
    local: SocketAddr,
}

/// `8080` or `127.0.0.1:8080`.
fn local_address(text: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse()
        .map_err(|_| format!("{text:?} is neither a port nor ADDRESS:PORT"))
}

struct Forward {
    client: Client,
    /// `/v1/namespaces/NS/apps/NAME/proxy`: each request's path and query go after it.
    base: String,
    /// A request holds one from before it is sent until its answer's body ends: the API
    /// connections in use (HTTP/1.1, one a request) never outnumber [`API_CONNECTIONS`].
    connections: Arc<Semaphore>,
}

/// The most API connections a port-forward uses: well under the API's cap on one client's
/// (`--api-client-connections`, 100 by default), which other commands and nodes on the
/// same address share.
const API_CONNECTIONS: usize = 32;

pub async fn run(ctx: Context, args: PortForwardArgs) -> Result<()> {
    let client = ctx.client()?;
    // Said now, with the usual exit code, rather than on each request.
    let described: shoal_api::Describe = client
        .get(&format!(
            "/v1/apps/{}?namespace={}",
            seg(&args.app),
            seg(&ctx.namespace)
        ))
        .await?;
    let kind = described.app.spec.component.kind;
    if kind != shoal_core::spec::Kind::Http {
        return Err(crate::exit::usage(format!(
            "app {}/{} is a {kind}: only http apps serve requests",
            ctx.namespace, args.app
        )));
    }
    let listener = tokio::net::TcpListener::bind(args.local)
        .await
        .map_err(|e| {
            let code = match e.kind() {
                std::io::ErrorKind::AddrInUse => crate::exit::CONFLICT,
                _ => 1,
            };
            crate::exit::fail(code, format!("cannot listen on {}: {e}", args.local))
        })?;
    let at = listener.local_addr().context("the listener's address")?;
    let forward = Arc::new(Forward {
        client,
        base: format!(
            "/v1/namespaces/{}/apps/{}/proxy",
            seg(&ctx.namespace),
            seg(&args.app)
        ),
        connections: Arc::new(Semaphore::new(API_CONNECTIONS)),
    });
    crate::output::write_stdout(
        format!(
            "Forwarding from http://{at} to app {}/{}\n",
            ctx.namespace, args.app
        )
        .as_bytes(),
    )?;
    let router = axum::Router::new().fallback(one).with_state(forward);
    // Answers stream through a piece at a time: no Nagle wait for each.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router)
        .await
        .context("serving the local port")
}

/// Headers the local connection and the API's client set for themselves.
const OWN: [HeaderName; 7] = [
    header::AUTHORIZATION,
    header::HOST,
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// One request, sent on through the API; its answer, or a 502 saying why there is none.
async fn one(State(forward): State<Arc<Forward>>, req: Request) -> Response {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Some(path) = within_app(path) else {
        return failed(format!("{path:?} is no path and query"));
    };
    let url = format!("{}{path}", forward.base);
    for name in OWN {
        parts.headers.remove(name);
    }
    let connection = Arc::clone(&forward.connections)
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    let request = forward
        .client
        .request(parts.method.clone(), &url)
        .headers(parts.headers)
        .body(reqwest::Body::wrap_stream(body.into_data_stream()));
    match forward.client.answer(request).await {
        Ok(answer) => {
            let mut response = Response::builder().status(answer.status());
            if let Some(headers) = response.headers_mut() {
                *headers = answer.headers().clone();
                for name in OWN {
                    headers.remove(name);
                }
            }
            let body = answer
                .bytes_stream()
                .map_err(std::io::Error::other)
                // The connection is the body's until it ends (or the local client leaves).
                .inspect(move |_| {
                    let _ = &connection;
                });
            let body = Body::from_stream(body);
            response
                .body(body)
                .unwrap_or_else(|e| failed(format!("{e}")))
        }
        Err(e) => {
            eprintln!("shoal: {} {path}: {e:#}", parts.method);
            failed(format!("{e:#}"))
        }
    }
}

/// `path` (and query) with its dot segments resolved as within the app: appended to the
/// proxy's path unresolved, `/../..` would climb out of it to other API routes, sent with
/// this CLI's token.
fn within_app(path: &str) -> Option<String> {
    let url = reqwest::Url::parse(&format!("http://app{path}")).ok()?;
    Some(match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    })
}

fn failed(why: String) -> Response {
    (
        StatusCode::BAD_GATEWAY,
        format!("shoal port-forward: {why}\n"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dot segments, however spelled, stay within the app's paths.
    #[test]
    fn a_path_never_climbs_out_of_the_app() {
        assert_eq!(within_app("/a/b?c=d").unwrap(), "/a/b?c=d");
        assert_eq!(within_app("/../../../../v1/tokens").unwrap(), "/v1/tokens");
        assert_eq!(within_app("/%2e%2e/%2E%2E/v1/nodes").unwrap(), "/v1/nodes");
        assert_eq!(within_app("/a/./b/../c").unwrap(), "/a/c");
        assert_eq!(within_app("/").unwrap(), "/");
    }

    #[test]
    fn a_local_address_is_a_port_or_an_address_and_port() {
        assert_eq!(
            local_address("8080").unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(
            local_address("0.0.0.0:9000").unwrap(),
            "0.0.0.0:9000".parse().unwrap()
        );
        assert!(local_address("localhost").is_err());
        assert!(local_address("70000").is_err());
    }
}
