"""A department system written in Python: a consumer calling govshare through its .proto files
with grpcio, the way the README tells other-language clients to.

Usage: python_consumer.py PROTO_DIR ADDR IDENTITY_DIR DATASET_ID

It compiles the .proto files (grpcio-tools), connects with mutual TLS (node.pem, node.key,
ca.pem from IDENTITY_DIR), asks who it is, files a demand for DATASET_ID and waits for it to be
approved, then makes a Request for id_number "py-1". It prints one line per step, waits for a
line on stdin (the test lets the broker's idle timeout end the connection meanwhile), and makes
a second Request on the same channel. Exit status 0 only if every step did what it should.
"""

import sys
import time

from govshare_py import channel as connect, compile_protos, step


def main():
    proto_dir, addr, identity, dataset = sys.argv[1:5]
    compile_protos(proto_dir)
    from govshare.v1 import common_pb2, exchange_pb2, exchange_pb2_grpc
    from govshare.v1 import node_pb2, node_pb2_grpc, sharing_pb2, sharing_pb2_grpc

    channel = connect(addr, identity)

    who = node_pb2_grpc.NodeServiceStub(channel).WhoAmI(node_pb2.WhoAmIRequest(), timeout=10)
    step("whoami", who.node_id)

    sharing = sharing_pb2_grpc.SharingServiceStub(channel)
    demand = sharing.FileDemand(sharing_pb2.FileDemandRequest(
        dataset_id=dataset, fields=["id_number", "status"],
        purpose="check pension recipients are alive"), timeout=10).demand
    deadline = time.monotonic() + 20
    while demand.state != sharing_pb2.DEMAND_STATE_APPROVED:
        if time.monotonic() > deadline:
            sys.exit(f"the demand was not approved: {demand}")
        time.sleep(0.05)
        demand = sharing.GetDemand(sharing_pb2.GetDemandRequest(id=demand.id), timeout=10)
    step("approved", demand.grant_id)

    exchange = exchange_pb2_grpc.ExchangeServiceStub(channel)

    def ask(id_number):
        request = exchange_pb2.ExchangeRequest(
            dataset_id=dataset,
            query=common_pb2.Query(
                filters=[common_pb2.Filter(
                    item="id_number", value=common_pb2.Value(string_value=id_number))],
                fields=["id_number", "status"]))
        result = exchange.Request(request, timeout=10)
        if result.state != exchange_pb2.EXCHANGE_STATE_ANSWERED:
            sys.exit(f"not answered: {result}")
        rows = [{k: v.string_value for k, v in row.fields.items()} for row in result.rows]
        if rows != [{"id_number": id_number, "status": "ALIVE"}]:
            sys.exit(f"the answer is not the provider's row about {id_number}: {result}")
        return exchange_pb2.ExchangeState.Name(result.state)

    step("answered", ask("py-1"))
    step("waiting", "for the idle timeout")
    if sys.stdin.readline().strip() != "go":
        sys.exit("the test did not say go")
    # The broker has told the idle connection to go away; the channel opens a new one.
    step("answered", ask("py-2"))
    channel.close()


if __name__ == "__main__":
    main()
