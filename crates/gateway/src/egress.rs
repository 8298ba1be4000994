//! Where granted egress may connect. A grant names a host, not what it resolves to: a name
//! that resolves to the node's loopback or its network would let a guest reach the control
//! plane's API or another node's. So the egress client's connector checks every address it is
//! about to connect to, after resolving, and connects to exactly the addresses it checked (no
//! second lookup a rebinding DNS server could answer differently).

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::TokioIo;
use shoal_core::spec::{OutboundHost, Reach, reach};
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::net::TcpStream;
use tower_service::Service;

type BoxError = Box<dyn StdError + Send + Sync>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;

/// Which addresses egress may reach: public ones always, private ones only if the node
/// allows it (`GatewayConfig::allow_private_egress`), [`Reach::Never`] ones never.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Guard {
    pub(crate) allow_private: bool,
}

impl Guard {
    fn check(self, host: &str, addr: IpAddr) -> Result<(), Refused> {
        let allowed = match reach(addr) {
            Reach::Public => true,
            Reach::Private => self.allow_private,
            Reach::Never => false,
        };
        if allowed {
            return Ok(());
        }
        tracing::info!(%host, %addr, "outbound request refused: not a public address");
        Err(Refused {
            host: host.to_string(),
            addr,
        })
    }
}

/// A destination egress may not connect to; the guest sees its request denied.
#[derive(Debug)]
pub(crate) struct Refused {
    host: String,
    addr: IpAddr,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}) is not a public address; egress to it is refused",
            self.host, self.addr
        )
    }
}

impl StdError for Refused {}

/// Resolves a granted name and refuses it whole if any of its addresses may not be reached:
/// the connector may try any of them, and a name that is sometimes private should not
/// work sometimes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Resolver(pub(crate) Guard);

impl Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let guard = self.0;
        Box::pin(async move {
            let host = name.as_str();
            // The connector sets the port.
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, 0)).await?.collect();
            for addr in &addrs {
                guard.check(host, addr.ip())?;
            }
            Ok(addrs.into_iter())
        })
    }
}

/// The egress client's connector: an [`HttpConnector`] on a [`Resolver`], which checks
/// IP-literal hosts itself because the connector connects to those without resolving.
#[derive(Debug, Clone)]
pub(crate) struct Connector {
    pub(crate) http: HttpConnector<Resolver>,
    pub(crate) guard: Guard,
}

impl Service<http::Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: http::Uri) -> Self::Future {
        let host = dst.host().unwrap_or_default();
        if let OutboundHost::Ip(addr) = OutboundHost::of_uri(host)
            && let Err(refused) = self.guard.check(host, addr)
        {
            return Box::pin(async move { Err(refused.into()) });
        }
        let connecting = self.http.call(dst);
        Box::pin(async move { connecting.await.map_err(Into::into) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connector(allow_private: bool) -> Connector {
        let guard = Guard { allow_private };
        Connector {
            http: HttpConnector::new_with_resolver(Resolver(guard)),
            guard,
        }
    }

    async fn connect(allow_private: bool, url: &str) -> Result<(), BoxError> {
        connector(allow_private)
            .call(url.parse().unwrap())
            .await
            .map(drop)
    }

    fn refused(result: Result<(), BoxError>) -> bool {
        result.is_err_and(|e| {
            let mut cause: Option<&(dyn StdError + 'static)> = Some(&*e);
            while let Some(c) = cause {
                if c.is::<Refused>() {
                    return true;
                }
                cause = c.source();
            }
            false
        })
    }

    #[tokio::test]
    async fn private_destinations_are_refused_before_connecting() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        for url in [
            format!("http://127.0.0.1:{port}/"),
            format!("http://localhost:{port}/"),
            format!("http://[::ffff:127.0.0.1]:{port}/"),
        ] {
            assert!(refused(connect(false, &url).await), "{url}");
        }
        // The node allows private egress: literal and resolved loopback connect.
        assert!(
            connect(true, &format!("http://127.0.0.1:{port}/"))
                .await
                .is_ok()
        );
        assert!(
            connect(true, &format!("http://localhost:{port}/"))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn link_local_is_refused_even_where_private_egress_is_allowed() {
        for url in [
            "http://169.254.169.254/",
            "http://[fe80::1]/",
            "http://0.0.0.0/",
        ] {
            assert!(refused(connect(true, url).await), "{url}");
        }
    }
}
