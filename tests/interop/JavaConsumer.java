// A department system written in Java: a consumer calling govshare through code generated from
// its .proto files (protoc's java_out and protoc-gen-grpc-java) with grpc-java on Netty, over
// mutual TLS.
//
// Usage: java JavaConsumer ADDR IDENTITY_DIR DATASET_ID
//
// Like python_consumer.py: asks who it is, files a demand for DATASET_ID and waits for its
// approval, makes a Request for id_number "java-1", prints one line per step, waits for "go" on
// stdin (the test lets the broker's idle timeout end the connection meanwhile), then makes a
// second Request on the same channel. Exit status 0 only if every step did what it should.

import cn.gov.govshare.v1.DemandState;
import cn.gov.govshare.v1.Demand;
import cn.gov.govshare.v1.ExchangeRequest;
import cn.gov.govshare.v1.ExchangeResult;
import cn.gov.govshare.v1.ExchangeServiceGrpc;
import cn.gov.govshare.v1.ExchangeState;
import cn.gov.govshare.v1.FileDemandRequest;
import cn.gov.govshare.v1.Filter;
import cn.gov.govshare.v1.GetDemandRequest;
import cn.gov.govshare.v1.NodeServiceGrpc;
import cn.gov.govshare.v1.Query;
import cn.gov.govshare.v1.Row;
import cn.gov.govshare.v1.SharingServiceGrpc;
import cn.gov.govshare.v1.Value;
import cn.gov.govshare.v1.WhoAmIRequest;
import io.grpc.ManagedChannel;
import io.grpc.netty.GrpcSslContexts;
import io.grpc.netty.NettyChannelBuilder;
import java.io.BufferedReader;
import java.io.File;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.TimeUnit;

public final class JavaConsumer {
  private JavaConsumer() {}

  private static void fail(String why) {
    System.err.println(why);
    System.exit(1);
  }

  private static void step(String what, String value) {
    System.out.println(what + " " + value);
    System.out.flush();
  }

  public static void main(String[] args) throws Exception {
    if (args.length != 3) {
      fail("usage: JavaConsumer ADDR IDENTITY_DIR DATASET_ID");
    }
    String addr = args[0];
    File identity = new File(args[1]);
    String dataset = args[2];

    ManagedChannel channel =
        NettyChannelBuilder.forTarget(addr)
            .sslContext(
                GrpcSslContexts.forClient()
                    .trustManager(new File(identity, "ca.pem"))
                    .keyManager(new File(identity, "node.pem"), new File(identity, "node.key"))
                    .build())
            // The broker's development certificate names localhost; the test dials 127.0.0.1.
            .overrideAuthority("localhost")
            .build();
    try {
      String who =
          NodeServiceGrpc.newBlockingStub(channel)
              .withDeadlineAfter(10, TimeUnit.SECONDS)
              .whoAmI(WhoAmIRequest.getDefaultInstance())
              .getNodeId();
      step("whoami", who);

      SharingServiceGrpc.SharingServiceBlockingStub sharing =
          SharingServiceGrpc.newBlockingStub(channel);
      Demand demand =
          sharing
              .withDeadlineAfter(10, TimeUnit.SECONDS)
              .fileDemand(
                  FileDemandRequest.newBuilder()
                      .setDatasetId(dataset)
                      .addFields("id_number")
                      .addFields("status")
                      .setPurpose("check pension recipients are alive")
                      .build())
              .getDemand();
      long until = System.nanoTime() + TimeUnit.SECONDS.toNanos(20);
      while (demand.getState() != DemandState.DEMAND_STATE_APPROVED) {
        if (System.nanoTime() > until) {
          fail("the demand was not approved: " + demand);
        }
        Thread.sleep(50);
        demand =
            sharing
                .withDeadlineAfter(10, TimeUnit.SECONDS)
                .getDemand(GetDemandRequest.newBuilder().setId(demand.getId()).build());
      }
      step("approved", demand.getGrantId());

      ExchangeServiceGrpc.ExchangeServiceBlockingStub exchange =
          ExchangeServiceGrpc.newBlockingStub(channel);
      step("answered", ask(exchange, dataset, "java-1"));
      step("waiting", "for the idle timeout");
      BufferedReader in =
          new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
      String go = in.readLine();
      if (go == null || !go.trim().equals("go")) {
        fail("the test did not say go");
      }
      // The broker has told the idle connection to go away; the channel opens a new one.
      step("answered", ask(exchange, dataset, "java-2"));
    } finally {
      channel.shutdown().awaitTermination(5, TimeUnit.SECONDS);
    }
  }

  private static String ask(
      ExchangeServiceGrpc.ExchangeServiceBlockingStub exchange, String dataset, String idNumber) {
    ExchangeResult result =
        exchange
            .withDeadlineAfter(10, TimeUnit.SECONDS)
            .request(
                ExchangeRequest.newBuilder()
                    .setDatasetId(dataset)
                    .setQuery(
                        Query.newBuilder()
                            .addFilters(
                                Filter.newBuilder()
                                    .setItem("id_number")
                                    .setValue(Value.newBuilder().setStringValue(idNumber)))
                            .addFields("id_number")
                            .addFields("status"))
                    .build());
    if (result.getState() != ExchangeState.EXCHANGE_STATE_ANSWERED) {
      fail("not answered: " + result);
    }
    boolean ok = result.getRowsCount() == 1;
    if (ok) {
      Row row = result.getRows(0);
      ok =
          row.getFieldsCount() == 2
              && row.getFieldsOrDefault("id_number", Value.getDefaultInstance())
                  .getStringValue()
                  .equals(idNumber)
              && row.getFieldsOrDefault("status", Value.getDefaultInstance())
                  .getStringValue()
                  .equals("ALIVE");
    }
    if (!ok) {
      fail("the answer is not the provider's row about " + idNumber + ": " + result);
    }
    return result.getState().name();
  }
}
