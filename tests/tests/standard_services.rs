//! The standard gRPC services, called with their standard generated clients: health checking
//! (`grpc.health.v1`) and server reflection (`grpc.reflection.v1`).

use anyhow::{ensure, Context, Result};
use govshare_tests::TestBroker;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

#[tokio::test]
async fn health_reports_serving_for_the_broker_and_each_service() -> Result<()> {
    let broker = TestBroker::start().await?;
    let admin = broker.admin().await?;
    let mut health = HealthClient::new(admin.channel());
    for service in [
        "",
        "govshare.v1.ExchangeService",
        "govshare.v1.CatalogService",
    ] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?
            .into_inner();
        ensure!(r.status() == ServingStatus::Serving, "{service:?}: {r:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await;
    ensure!(
        unknown.is_err_and(|s| s.code() == tonic::Code::NotFound),
        "unknown services are NOT_FOUND"
    );
    broker.shutdown().await
}

#[tokio::test]
async fn reflection_lists_and_describes_the_api() -> Result<()> {
    let broker = TestBroker::start().await?;
    let admin = broker.admin().await?;
    let mut refl = ServerReflectionClient::new(admin.channel());
    let ask = |m: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(vec![
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol(
                "govshare.v1.ExchangeService".into(),
            )),
        ]))
        .await?
        .into_inner();
    let list = stream.message().await?.context("no list answer")?;
    let Some(MessageResponse::ListServicesResponse(services)) = list.message_response else {
        anyhow::bail!("unexpected answer {list:?}");
    };
    let names: Vec<String> = services.service.into_iter().map(|s| s.name).collect();
    for want in [
        "govshare.v1.ExchangeService",
        "govshare.v1.SharingService",
        "grpc.health.v1.Health",
    ] {
        ensure!(
            names.iter().any(|n| n == want),
            "{want} not listed in {names:?}"
        );
    }
    let file = stream.message().await?.context("no file answer")?;
    let Some(MessageResponse::FileDescriptorResponse(fd)) = file.message_response else {
        anyhow::bail!("unexpected answer {file:?}");
    };
    ensure!(!fd.file_descriptor_proto.is_empty());
    broker.shutdown().await
}
