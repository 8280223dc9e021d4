"""A department system written in Python: a provider instance serving its datasets on
govshare's Serve stream with grpcio, built from the .proto files.

Usage: python_provider.py PROTO_DIR ADDR IDENTITY_DIR

It opens the stream with a hello (all of its datasets, 4 requests in flight), prints
"ready BROKER_ID" once the broker accepts it, and answers every request with one row: the
asked id_number, status ALIVE. Each answer gives the broker one more credit. It runs until the
stream ends or it is killed.
"""

import queue
import sys

from govshare_py import channel, compile_protos, step


def main():
    proto_dir, addr, identity = sys.argv[1:4]
    compile_protos(proto_dir)
    from govshare.v1 import common_pb2, exchange_pb2, exchange_pb2_grpc

    outbox = queue.Queue()
    outbox.put(exchange_pb2.ProviderMessage(
        hello=exchange_pb2.ServeHello(max_in_flight=4, instance="python")))

    def messages():
        while True:
            yield outbox.get()

    stream = exchange_pb2_grpc.ExchangeServiceStub(channel(addr, identity)).Serve(messages())
    for msg in stream:
        kind = msg.WhichOneof("body")
        if kind == "ready":
            step("ready", msg.ready.broker_id)
        elif kind == "request":
            req = msg.request
            asked = {f.item: f.value.string_value for f in req.query.filters}
            row = common_pb2.Row()
            row.fields["id_number"].string_value = asked.get("id_number", "")
            row.fields["status"].string_value = "ALIVE"
            outbox.put(exchange_pb2.ProviderMessage(answer=exchange_pb2.ProviderAnswer(
                delivery_id=req.delivery_id, rows=[row])))
            outbox.put(exchange_pb2.ProviderMessage(credit=exchange_pb2.ServeCredit(add=1)))
            step("answered", req.exchange_id)


if __name__ == "__main__":
    main()
