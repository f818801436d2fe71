"""A fake OpenAI-compatible upstream for .ci/docker-smoke: standard library only, loopback only.

    python3 .ci/fake_upstream.py PORT_FILE

Listens on 127.0.0.1 on a free port and writes the port number to PORT_FILE once it accepts connections.
POST /v1/chat/completions answers a chat completion whose content names the model it was asked for; with
"stream": true it answers an SSE stream of chunks a few hundred milliseconds apart, ending with
`data: [DONE]`. A model whose name ends in "-slow" streams longer, so a test can stop the gateway while a
stream is in flight. Every request is logged to stderr (method, path, model, whether it carried an
Authorization header), never the header's value.
"""

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNKS = {False: (4, 0.2), True: (8, 0.4)}  # slow model?: (chunk count, seconds between chunks)


def completion(model, **fields):
    return {"id": "chatcmpl-smoke", "created": int(time.time()), "model": model, **fields}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked streaming, as Ollama and OpenAI answer

    def do_POST(self):
        body = self.read_body()
        try:
            request = json.loads(body)
            model = request["model"]
        except (ValueError, KeyError, TypeError):
            return self.send_json(400, {"error": {"message": "bad request body", "type": "invalid_request_error"}})
        self.log_message(
            "%s %s model=%s authorization=%s", self.command, self.path, model,
            "present" if self.headers.get("Authorization") else "absent",
        )
        if self.path != "/v1/chat/completions":
            return self.send_json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
        if not request.get("stream"):
            message = {"role": "assistant", "content": f"fake reply from {model}"}
            return self.send_json(200, completion(
                model, object="chat.completion",
                choices=[{"index": 0, "message": message, "finish_reason": "stop"}],
                usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
            ))
        count, gap = CHUNKS[model.endswith("-slow")]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for i in range(count):
                if i:
                    time.sleep(gap)
                delta = {"role": "assistant", "content": f"chunk{i} "} if i == 0 else {"content": f"chunk{i} "}
                event = completion(model, object="chat.completion.chunk",
                                   choices=[{"index": 0, "delta": delta, "finish_reason": None}])
                self.write_chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
            self.write_chunk(b"data: [DONE]\n\n")
            self.write_chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            self.log_message("stream for %s closed by the gateway", model)
            self.close_connection = True

    def read_body(self):
        # The gateway sends every POST with a Content-Length, never a chunked body.
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def write_chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def send_json(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    with open(sys.argv[1], "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main()
