"""Talk to `homeforge serve` over gRPC: list the models, stream a chat answer, embed a text.

    homeforge serve MODEL_DIR --grpc-port 50051
    python examples/grpc_client.py --target 127.0.0.1:50051 --api-key hfk_...   # or HOMEFORGE_API_KEY

The stubs ship inside homeforge (``homeforge.serve.rpc``); in another language, generate them
from ``src/homeforge/serve/rpc/inference.proto``. The key goes in the metadata, as
``authorization: Bearer KEY``; errors are gRPC status codes with the HTTP API's messages
(INVALID_ARGUMENT names the field, RESOURCE_EXHAUSTED carries ``retry-after``).
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc

from homeforge.serve.rpc import inference_pb2 as pb
from homeforge.serve.rpc import inference_pb2_grpc as pb_grpc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the gRPC server")
    ap.add_argument("--api-key", default=os.environ.get("HOMEFORGE_API_KEY"), help="an API key (if keys are on)")
    ap.add_argument("--prompt", default="Write one sentence about the sea.", help="the user's message")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        try:
            models = stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=30)
            print("models:", ", ".join(m.id for m in models.data))
            request = pb.ChatRequest(messages=[pb.Message(role="user", content=args.prompt)],
                                     max_tokens=args.max_tokens, temperature=0.0)
            for chunk in stub.Chat(request, metadata=metadata, timeout=600):  # server streaming
                if chunk.text:
                    print(chunk.text, end="", flush=True)
                if chunk.finish_reason:
                    print(f"\n[finish: {chunk.finish_reason}{' - ' + chunk.error if chunk.error else ''}]")
                if chunk.HasField("usage"):
                    u = chunk.usage
                    print(f"[tokens: prompt {u.prompt_tokens}, completion {u.completion_tokens}]")
        except grpc.RpcError as err:
            print(f"{err.code().name}: {err.details()}", file=sys.stderr)
            return 1
        try:  # not every backend has embeddings (an ONNX export, a classifier): a refusal is not fatal here
            emb = stub.Embed(pb.EmbedRequest(input=[args.prompt]), metadata=metadata, timeout=60)
            print(f"embedding: {len(emb.data[0].embedding)} dimensions")
        except grpc.RpcError as err:
            print(f"no embedding: {err.code().name}: {err.details()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
