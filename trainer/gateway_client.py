"""The retrain's view of a running gateway: the admin client of `protege adapters`, plus the
two things a cycle also needs (which version serves a task, and a greedy chat call).

The trainer is its own process; it changes what the gateway serves only through the gateway's
admin API, so the registry, its locks and its draining stay the one authority.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.adapters_cli import AdminClient
from router.cascade import logprob_stats
from trainer.evaluate import ChatAnswer


@dataclass(frozen=True)
class ServedAdapter:
    name: str  # task@vN
    task: str
    path: str
    weights_sha256: str


class GatewayClient(AdminClient):
    def current(self, task: str) -> ServedAdapter | None:
        """The version the task's every-caller alias points at, or None."""
        listing = self.list()
        version = next((a["version"] for a in listing["aliases"] if a["task"] == task and not a["tenant"]), None)
        for item in listing["data"]:
            if item["name"] == version:
                return ServedAdapter(item["name"], item["task"], item["path"], item["weights_sha256"])
        return None

    def register(self, task: str, path: str) -> ServedAdapter:
        item = self.load(task, path)
        return ServedAdapter(item["name"], item["task"], item["path"], item["weights_sha256"])

    def chat(self, model: str, messages: list[dict[str, Any]], max_tokens: int,
             response_format: dict[str, Any] | None = None) -> ChatAnswer:
        # Log-probabilities too: the promoted version's cascade threshold is calibrated on them.
        body: dict[str, Any] = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens,
                                "logprobs": True}
        if response_format is not None:
            body["response_format"] = response_format
        reply = self._call("POST", "/v1/chat/completions", body)
        mean_logprob, min_logprob = logprob_stats(reply)
        return ChatAnswer(reply["choices"][0]["message"].get("content") or "", mean_logprob, min_logprob)
