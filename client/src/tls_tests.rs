//! The client against a fake broker over real mutual TLS: connecting, deadlines, retries,
//! paging, error reporting, and identity checks.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use govshare_proto::v1::node_service_server::{NodeService, NodeServiceServer};
use govshare_proto::v1::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tonic::transport::{Server, ServerTlsConfig};
use tonic::{Code, Request, Response, Status};

use crate::{Client, ClientConfig, ClientError, Identity};

/// A development PKI: a CA, a broker certificate for localhost/127.0.0.1, and node identities.
struct Pki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

struct Issued {
    cert_pem: String,
    key_pem: String,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).unwrap();
        Pki {
            ca_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn issue(&self, sans: &[&str], cn: &str, server: bool) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Writes an identity directory for a node.
    fn identity_dir(&self, dir: &Path, cn: &str) {
        let node = self.issue(&[], cn, false);
        std::fs::write(dir.join("node.pem"), &node.cert_pem).unwrap();
        std::fs::write(dir.join("node.key"), &node.key_pem).unwrap();
        std::fs::write(dir.join("ca.pem"), &self.ca_pem).unwrap();
    }
}

/// A NodeService whose answers exercise the client: `register_node` is UNAVAILABLE for the
/// first `flaky` calls, `suspend_node` is slow, `list_nodes` has three pages.
#[derive(Debug, Default)]
struct FakeNodes {
    register_calls: AtomicU32,
    flaky: u32,
}

/// The service handle tonic holds; the test keeps another `Arc` to read the counters.
#[derive(Debug)]
struct Fake(Arc<FakeNodes>);

fn node(id: &str) -> Node {
    Node {
        id: id.to_string(),
        name: "测试节点".to_string(),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl NodeService for Fake {
    async fn register_node(
        &self,
        request: Request<RegisterNodeRequest>,
    ) -> Result<Response<RegisterNodeResponse>, Status> {
        let n = self.0.register_calls.fetch_add(1, Ordering::SeqCst);
        if n < self.0.flaky {
            return Err(Status::unavailable("starting up"));
        }
        let req = request.into_inner();
        Ok(Response::new(RegisterNodeResponse {
            node: Some(node(&req.id)),
            warnings: vec!["credit code check digit does not verify".to_string()],
        }))
    }

    async fn get_node(&self, request: Request<GetNodeRequest>) -> Result<Response<Node>, Status> {
        let id = request.into_inner().id;
        if id == "330000/missing" {
            return Err(Status::not_found(format!("node {id} is not registered")));
        }
        Ok(Response::new(node(&id)))
    }

    async fn list_nodes(
        &self,
        request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        let token = request.into_inner().page_token;
        let (ids, next): (&[&str], &str) = match token.as_str() {
            "" => (&["330000/a", "330000/b"], "p2"),
            "p2" => (&["330100/c"], "p3"),
            "p3" => (&["330200/d"], ""),
            _ => return Err(Status::invalid_argument("bad page token")),
        };
        Ok(Response::new(ListNodesResponse {
            nodes: ids.iter().map(|i| node(i)).collect(),
            next_page_token: next.to_string(),
        }))
    }

    async fn suspend_node(
        &self,
        _request: Request<SuspendNodeRequest>,
    ) -> Result<Response<Node>, Status> {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok(Response::new(node("slow")))
    }

    async fn pin_certificate(
        &self,
        _request: Request<PinCertificateRequest>,
    ) -> Result<Response<Node>, Status> {
        Err(Status::unimplemented("not used by these tests"))
    }

    async fn resume_node(
        &self,
        request: Request<ResumeNodeRequest>,
    ) -> Result<Response<Node>, Status> {
        // Echo the deadline the client sent, so the test can see it.
        let timeout = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        Ok(Response::new(Node {
            id: request.into_inner().id,
            contact: timeout,
            ..Default::default()
        }))
    }

    async fn list_broker_keys(
        &self,
        _: Request<ListBrokerKeysRequest>,
    ) -> Result<Response<ListBrokerKeysResponse>, Status> {
        Ok(Response::new(ListBrokerKeysResponse { keys: Vec::new() }))
    }

    async fn who_am_i(
        &self,
        request: Request<WhoAmIRequest>,
    ) -> Result<Response<WhoAmIResponse>, Status> {
        // The client's certificate reached the server: mutual TLS is in effect.
        let certs = request.peer_certs().map_or(0, |c| c.len());
        if certs == 0 {
            return Err(Status::unauthenticated("no client certificate"));
        }
        Ok(Response::new(WhoAmIResponse {
            node_id: "330000/hrss".to_string(),
            role: NodeRole::Department as i32,
            node: None,
            broker_id: "330000/broker".to_string(),
        }))
    }
}

/// Serves the fake NodeService over mutual TLS on a port chosen by the OS.
async fn serve(pki: &Pki, fake: Arc<FakeNodes>) -> SocketAddr {
    crate::install_crypto_provider();
    let broker = pki.issue(&["localhost", "127.0.0.1"], "broker", true);
    let tls = ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            &broker.cert_pem,
            &broker.key_pem,
        ))
        .client_ca_root(tonic::transport::Certificate::from_pem(&pki.ca_pem));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let router = Server::builder()
        .tls_config(tls)
        .unwrap()
        .add_service(NodeServiceServer::new(Fake(fake)));
    tokio::spawn(async move {
        let _ = router.serve_with_incoming(incoming).await;
    });
    addr
}

fn config(dir: &Path, addr: SocketAddr) -> ClientConfig {
    ClientConfig {
        broker_url: format!("https://127.0.0.1:{}", addr.port()),
        identity_dir: dir.to_path_buf(),
        timeout: Duration::from_secs(5),
        ..ClientConfig::default()
    }
}

#[tokio::test]
async fn mutual_tls_calls_paging_retries_and_errors() {
    let pki = Pki::new("govshare test CA");
    let dir = tempfile::tempdir().unwrap();
    pki.identity_dir(dir.path(), "330000/hrss");
    let fake = Arc::new(FakeNodes {
        flaky: 2,
        ..Default::default()
    });
    let addr = serve(&pki, fake.clone()).await;
    let client = Client::connect(config(dir.path(), addr)).await.unwrap();

    let me = client.whoami().await.unwrap();
    assert_eq!(me.node_id, "330000/hrss");
    assert_eq!(me.broker_id, "330000/broker");

    // Pages are followed to the end.
    let nodes = client.list_all_nodes("").await.unwrap();
    let ids: Vec<_> = nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(ids, ["330000/a", "330000/b", "330100/c", "330200/d"]);

    // UNAVAILABLE is retried with backoff (100 ms + 200 ms here).
    let started = Instant::now();
    let resp = client
        .register_node(RegisterNodeRequest {
            id: "330000/new".into(),
            name: "新节点".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(resp.node.unwrap().id, "330000/new");
    assert_eq!(fake.register_calls.load(Ordering::SeqCst), 3);
    assert!(started.elapsed() >= Duration::from_millis(300));

    // Statuses come back whole, and print as CODE: message.
    let err = client.get_node("330000/missing").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));
    assert_eq!(
        err.to_string(),
        "NOT_FOUND: node 330000/missing is not registered"
    );

    // Every call carries the per-call deadline.
    let n = client
        .with_timeout(Duration::from_millis(1500))
        .resume_node("330000/x")
        .await
        .unwrap();
    assert!(
        n.contact.ends_with('m') || n.contact.ends_with('u'),
        "{}",
        n.contact
    );
    let err = client
        .with_timeout(Duration::from_millis(200))
        .suspend_node("330000/x", "")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::DeadlineExceeded), "{err}");

    // A service the broker does not serve reads UNIMPLEMENTED, not a crash.
    let err = client.get_dataset("330000/hrss/x").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unimplemented), "{err}");
    assert!(err.to_string().starts_with("UNIMPLEMENTED: "), "{err}");

    // Retries give up after `retries` attempts when the broker stays unavailable.
    let fake2 = Arc::new(FakeNodes {
        flaky: 100,
        ..Default::default()
    });
    let addr2 = serve(&pki, fake2.clone()).await;
    let cfg = ClientConfig {
        retries: 2,
        ..config(dir.path(), addr2)
    };
    let client2 = Client::connect(cfg).await.unwrap();
    let err = client2
        .register_node(RegisterNodeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable));
    assert_eq!(fake2.register_calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn connect_failures_are_clear() {
    let pki = Pki::new("govshare test CA");
    let dir = tempfile::tempdir().unwrap();
    pki.identity_dir(dir.path(), "330000/hrss");

    // Nothing listening.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = listener.local_addr().unwrap();
    drop(listener);
    let cfg = ClientConfig {
        retries: 1,
        ..config(dir.path(), closed)
    };
    let err = Client::connect(cfg).await.unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    assert_eq!(err.code(), Some(Code::Unavailable));
    let text = err.to_string();
    assert!(
        text.contains("cannot connect to broker at https://127.0.0.1:"),
        "{text}"
    );
    assert!(text.to_lowercase().contains("refused"), "{text}");

    // A broker whose certificate another CA signed.
    let addr = serve(&Pki::new("another CA"), Arc::new(FakeNodes::default())).await;
    let err = Client::connect(config(dir.path(), addr)).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    assert!(text.contains("not signed by the CA in ca.pem"), "{text}");

    // A broker certificate that does not name the host dialled.
    let addr = serve(&pki, Arc::new(FakeNodes::default())).await;
    let cfg = ClientConfig {
        tls_server_name: Some("broker.example".to_string()),
        ..config(dir.path(), addr)
    };
    let err = Client::connect(cfg).await.unwrap_err();
    assert!(err.to_string().contains("does not name this host"), "{err}");

    // A lazy client reports the failure from its first call.
    let identity = Identity::load(dir.path()).unwrap();
    let cfg = ClientConfig {
        retries: 0,
        ..config(dir.path(), closed)
    };
    let lazy = Client::connect_lazy(cfg, identity).unwrap();
    let err = lazy.whoami().await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    assert!(err.to_string().starts_with("UNAVAILABLE: "), "{err}");

    // Plain http and nonsense URLs are refused before dialling.
    for url in ["http://127.0.0.1:7443", "127.0.0.1:7443", "https://"] {
        let cfg = ClientConfig::new(dir.path()).with_broker_url(url);
        let err = Client::connect(cfg).await.unwrap_err();
        assert!(matches!(err, ClientError::Config { .. }), "{url}: {err:?}");
    }
}

#[test]
fn identity_errors_name_the_file() {
    let pki = Pki::new("govshare test CA");
    let dir = tempfile::tempdir().unwrap();

    let err = Identity::load(&dir.path().join("nope")).unwrap_err();
    assert!(err.to_string().contains("not a directory"), "{err}");

    let err = Identity::load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("node.pem: cannot read"), "{err}");

    pki.identity_dir(dir.path(), "330000/hrss");
    Identity::load(dir.path()).unwrap();

    // A key of another certificate.
    let other = pki.issue(&[], "other", false);
    std::fs::write(dir.path().join("node.key"), &other.key_pem).unwrap();
    let err = Identity::load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("node.key: unusable with"), "{err}");

    // Not a key at all.
    std::fs::write(dir.path().join("node.key"), "hello").unwrap();
    let err = Identity::load(dir.path()).unwrap_err();
    assert!(
        err.to_string().contains("node.key: no private key found"),
        "{err}"
    );

    // A CA file without certificates.
    pki.identity_dir(dir.path(), "330000/hrss");
    std::fs::write(dir.path().join("ca.pem"), "").unwrap();
    let err = Identity::load(dir.path()).unwrap_err();
    assert!(
        err.to_string().contains("ca.pem: no \"CERTIFICATE\""),
        "{err}"
    );

    // The key stays out of Debug output.
    pki.identity_dir(dir.path(), "330000/hrss");
    let id = Identity::load(dir.path()).unwrap();
    assert!(!format!("{id:?}").contains("PRIVATE KEY"));
}

#[test]
fn expired_certificates_are_refused() {
    let pki = Pki::new("govshare test CA");
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let cert = params.signed_by(&key, &pki.issuer).unwrap();
    let err = Identity::from_pem(cert.pem(), key.serialize_pem(), pki.ca_pem.clone()).unwrap_err();
    assert!(
        err.to_string().contains("node.pem: certificate expired"),
        "{err}"
    );
}

#[tokio::test]
async fn a_refused_client_certificate_is_explained() {
    let pki = Pki::new("govshare test CA");
    let other = Pki::new("other CA");
    let dir = tempfile::tempdir().unwrap();
    other.identity_dir(dir.path(), "330000/hrss");
    std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).unwrap();
    let addr = serve(&pki, Arc::new(FakeNodes::default())).await;
    // The client cannot tell during the TLS 1.3 handshake; the first call fails.
    let client = Client::connect(config(dir.path(), addr)).await.unwrap();
    let err = client.whoami().await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("refused this node's certificate"), "{text}");
}
