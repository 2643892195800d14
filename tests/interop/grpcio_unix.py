"""A grpcio (gRPC C-core) client calls Lodestone's Identity service over
the CSI Unix socket, with a default `unix:` channel.

Such clients send the socket path (percent-encoded) as the HTTP/2
`:authority`, which is not a valid URI authority; the driver must serve
them all the same. Several calls share one channel, so later requests
refer to the client's HPACK dynamic table.

The messages are encoded and decoded by hand (a few protobuf fields) so
that grpcio is the only package needed. Run by tests/interop/run.sh, with
LODESTONE_BIN naming the driver binary.
"""

import os
import shutil
import subprocess
import tempfile
import time
import unittest

import grpc

DRIVER_NAME = "lvm.lodestone.dev"


def fields(buf):
    """The (field number, value) pairs of a protobuf message: varints as
    ints, length-delimited fields as bytes."""
    out = []
    i = 0

    def varint():
        nonlocal i
        shift = value = 0
        while True:
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value

    while i < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            out.append((number, varint()))
        elif wire == 2:
            n = varint()
            out.append((number, bytes(buf[i : i + n])))
            i += n
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return out


class GrpcioOverUnixSocket(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="lodestone-interop-")
        cls.socket = os.path.join(cls.dir, "csi.sock")
        cls.log_path = os.path.join(cls.dir, "lodestone.log")
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("LODESTONE_") and k != "CSI_ENDPOINT"
        }
        env.setdefault("RUST_LOG", "debug")
        with open(cls.log_path, "wb") as log:
            cls.driver = subprocess.Popen(
                [
                    os.environ["LODESTONE_BIN"],
                    "--endpoint",
                    "unix://" + cls.socket,
                    "--node-id",
                    "interop-node",
                    "--mode",
                    "all",
                    "--device-class",
                    "thin=lodestone-thin/pool0",
                    "--lvm-refresh-seconds",
                    "0",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                cwd=cls.dir,
            )
        deadline = time.monotonic() + 60
        while not os.path.exists(cls.socket):
            if cls.driver.poll() is not None or time.monotonic() > deadline:
                cls.tearDownClass()
                raise RuntimeError("lodestone did not start:\n" + cls.log())
            time.sleep(0.1)

    @classmethod
    def tearDownClass(cls):
        if cls.driver.poll() is None:
            cls.driver.terminate()
            try:
                cls.driver.wait(timeout=20)
            except subprocess.TimeoutExpired:
                cls.driver.kill()
                cls.driver.wait()
        shutil.rmtree(cls.dir, ignore_errors=True)

    @classmethod
    def log(cls):
        with open(cls.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def call(self, channel, method, request=b""):
        rpc = channel.unary_unary(
            "/csi.v1.Identity/" + method,
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        try:
            return fields(rpc(request, timeout=20))
        except grpc.RpcError as e:
            self.fail(f"{method}: {e.code()} {e.details()}\n{self.log()[-4000:]}")

    def test_get_plugin_info_and_probe(self):
        # Default options: the channel's authority is derived from the path.
        with grpc.insecure_channel("unix:" + self.socket) as channel:
            for _ in range(3):
                info = dict(self.call(channel, "GetPluginInfo"))
                self.assertEqual(info[1].decode(), DRIVER_NAME)
                self.assertTrue(info[2].decode(), "vendor_version is empty")
                probe = self.call(channel, "Probe")
                # ready is a BoolValue: present, whatever its value here
                # (the host has no volume group).
                self.assertEqual([n for n, _ in probe], [1], probe)

    def test_get_plugin_capabilities_on_fresh_channels(self):
        for target in ["unix:" + self.socket, "unix://" + self.socket]:
            with grpc.insecure_channel(target) as channel:
                caps = self.call(channel, "GetPluginCapabilities")
                self.assertTrue(caps, "no capabilities")
                self.assertTrue(all(n == 1 for n, _ in caps), caps)


if __name__ == "__main__":
    unittest.main()
