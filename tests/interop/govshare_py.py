"""What the Python interop programs share: compiling govshare's .proto files with grpcio-tools
and opening a mutual-TLS channel with a node's identity directory."""

import atexit
import os
import shutil
import sys
import tempfile

import grpc
import grpc_tools
from grpc_tools import protoc


def compile_protos(proto_dir):
    """Generates the Python modules for every govshare .proto file and makes them importable
    (as govshare.v1.*_pb2 and *_pb2_grpc)."""
    out = tempfile.mkdtemp(prefix="govshare-py-")
    # The modules are loaded once imported; the files are not needed after the program ends.
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    files = sorted(
        os.path.join("govshare", "v1", f)
        for f in os.listdir(os.path.join(proto_dir, "govshare", "v1"))
        if f.endswith(".proto")
    )
    args = ["protoc", "-I", proto_dir, "-I", well_known,
            "--python_out", out, "--grpc_python_out", out] + files
    if protoc.main(args) != 0:
        sys.exit("protoc failed on the govshare .proto files")
    sys.path.insert(0, out)


def channel(addr, identity):
    """A channel to the broker at addr, presenting node.pem and node.key from identity and
    trusting its ca.pem."""

    def read(name):
        with open(os.path.join(identity, name), "rb") as f:
            return f.read()

    creds = grpc.ssl_channel_credentials(
        root_certificates=read("ca.pem"),
        private_key=read("node.key"),
        certificate_chain=read("node.pem"),
    )
    # The broker's development certificate names localhost; the tests dial 127.0.0.1.
    return grpc.secure_channel(
        addr, creds, options=[("grpc.ssl_target_name_override", "localhost")])


def step(what, value):
    """Tells the test how far the program got, one line per step."""
    print(what, value, flush=True)
