"""A log with one request for each data source and each quality rule (shared by the builder
and TRL tests), and the build options those tests start from."""

from __future__ import annotations

from feedback.builder import BuildOptions
from tests.feedback.conftest import T0, LogSeed

BASE = BuildOptions(task="support", holdout_share=0.0, clock=lambda: T0 + 100_000)
LONG_PROMPT = ("Please write a short friendly note to the whole team reminding everyone that the quarterly "
               "planning meeting moves to the large room on the third floor next Thursday afternoon")


def seed_mixed_log(seed: LogSeed) -> None:
    """One request for each source and each rule; ids say what should happen to them."""
    teacher = "teacher"
    seed.request("keep-teacher", "How do I reset my password?", answer="Open settings and choose Reset password.",
                 route=teacher)
    seed.request("empty", "Why is the sky blue?", answer="   ", route=teacher)
    seed.request("rated-down", "Where is my invoice?", answer="Invoices are emailed weekly.", route=teacher)
    seed.feedback("rated-down", -1)
    seed.request("trunc-tokens", "List all the settings", answer="Setting one, setting two, setting",
                 route=teacher, params={"max_tokens": 20}, completion_tokens=20)
    seed.request("trunc-fence", "Print hello in python", answer="Here:\n```python\nprint('hel", route=teacher)
    seed.request("shadow-trunc", "Explain the refund policy", answer="meh")
    seed.shadow("shadow-trunc", "Refunds are possible within thirty days if", finish_reason="length")
    seed.request("refusal", "Can you help me log in?", answer="I'm sorry, but I can't help with that.", route=teacher)
    seed.request("too-long", "Tell me everything", answer="word " * 1500, route=teacher)
    seed.request("dup-a", "What are your opening hours?", answer="We are open nine to five.", route=teacher)
    seed.request("dup-b", "what are your opening hours", answer="We are open nine to five", route=teacher)
    seed.request("near-a", LONG_PROMPT, answer="Reminder: planning moves to the big room, 3rd floor, Thursday.",
                 route=teacher)
    seed.request("near-b", LONG_PROMPT + " please",
                 answer="Reminder: planning moves to the big room, 3rd floor, Thursday.", route=teacher)
    seed.request("pii", "My email is jo@example.com and my card is 4111 1111 1111 1111, update billing",
                 answer="Done, jo@example.com now has the new card on file.", route=teacher)
    seed.request("escalation", "What is 2+2?", answer="The answer is 4.", draft="The answer is 5.", route=teacher)
    seed.request("esc-same", "Capital of France?", answer="Paris is the capital.", draft="paris is the capital",
                 route=teacher)
    seed.request("correction", "Where is Lisbon?", answer="Lisbon is in Spain.")
    seed.feedback("correction", -1, correction="Lisbon is in Portugal.")
    seed.request("corr-empty", "What is the return address?", answer="")
    seed.feedback("corr-empty", -1, correction="Returns go to 1 Main Street.")
    seed.request("liked", "How do I change the theme?", answer="Use the blue button in settings.")
    seed.feedback("liked", 1)
    seed.request("liked-refusal", "How do I delete my account?", answer="I cannot help with that request.")
    seed.feedback("liked-refusal", 1)
    seed.request("disliked-refusal", "How do I export data?", answer="Sorry, I can't do that.")
    seed.feedback("disliked-refusal", -1)
    seed.request("shadow-down", "How long does shipping take?", answer="Shipping is instant everywhere.")
    seed.feedback("shadow-down", -1)
    seed.shadow("shadow-down", "Standard delivery takes three to five business days.")
    seed.request("preferred", "Summarise my plan", answer="Teacher summary of the plan.",
                 draft="Your plan: basic tier, billed monthly.", route=teacher)
    seed.feedback("preferred", 0.5, preferred="draft")
    # Requests that cannot become rows, and requests outside the build.
    seed.request("plain", "Just saying hi", answer="Hi!")
    seed.request("bad-json", "x")
    seed.db.conn.execute("UPDATE requests SET messages = '{not json' WHERE id = 'bad-json'")
    seed.request("tool-call", [{"role": "user", "content": "weather?"},
                               {"role": "assistant", "content": None, "tool_calls": [{"id": "t"}]},
                               {"role": "user", "content": "and?"}])
    seed.request("assistant-last", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "pre"}])
    seed.request("not-logged", "x")
    seed.db.conn.execute("UPDATE requests SET messages = NULL WHERE id = 'not-logged'")
    seed.request("failed", "Broken request", status="error", answer=None)
    seed.request("other-task", "Billing question", answer="Billing answer.", route=teacher, adapter="billing")
