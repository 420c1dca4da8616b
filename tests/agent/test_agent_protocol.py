"""Protocol hardening: replies that break Lagent 0.2.4 are parsed, explained to the model, and the run goes on.

The agent is driven by a recorded model (`ReplayModel`); the interpreter is the real sandbox where code runs.
"""
from __future__ import annotations

import pytest
from lagent.actions import ActionExecutor, BaseAction
from lagent.agents.internlm2_agent import Internlm2Protocol

from puyu.agent.agent import PuyuAgent
from puyu.agent.interpreter import SandboxInterpreter, extract_code
from puyu.agent.protocol import HardenedInternlm2Protocol
from puyu.agent.replay import ReplayModel
from puyu.agent.sandbox import Sandbox, SandboxConfig

CODE = "<|action_start|><|interpreter|>\n```python\n{}\n```<|action_end|>\n"
PLUGIN = "<|action_start|><|plugin|>\n{}<|action_end|>\n"


class Adder(BaseAction):
    """Adds two numbers."""

    def run(self, a: int, b: int) -> dict:
        """Add.

        Args:
            a (int): first
            b (int): second
        """
        return {"sum": a + b}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    with Sandbox(tmp_path_factory.mktemp("proto"), config=SandboxConfig(timeout_s=120)) as sb:
        yield sb


def make_agent(replies, sandbox=None, plugins=True, max_turn=6):
    events = []
    interp = ActionExecutor([SandboxInterpreter(sandbox)]) if sandbox else None
    agent = PuyuAgent(ReplayModel(replies), plugin_executor=ActionExecutor([Adder()]) if plugins else None,
                      interpreter_executor=interp, max_turn=max_turn, recorder=events.append)
    return agent, events


def test_lagent_itself_crashes_on_two_plugin_calls():
    """The weakness being fixed (if a Lagent release fixes it, this test says so)."""
    reply = "x" + PLUGIN.format('{"name": "Adder", "parameters": {"a": 1, "b": 2}}') * 2
    with pytest.raises(ValueError):
        Internlm2Protocol().parse(reply, ActionExecutor([Adder()]))


def test_two_plugin_calls_run_the_first_and_tell_the_model():
    call = PLUGIN.format('{"name": "Adder", "parameters": {"a": 1, "b": 2}}')
    agent, events = make_agent(["Let me add." + call + call, "The sum is 3."])
    ret = agent.chat("1+2?")
    assert ret.response == "The sum is 3."
    action = next(e for e in events if e["event"] == "action")
    assert action["name"] == "Adder" and action["ignored_calls"] == 1
    assert '"sum": 3' in action["response"] and "only the first one was executed" in action["response"]
    prompt = agent._llm.prompts[1]
    assert "only the first one was executed" in prompt and '{"sum": 3}' in prompt


def test_two_interpreter_calls_run_only_the_first(sandbox):
    reply = "Run." + CODE.format("counter = 1\nprint('first')") + CODE.format("counter = 99\nprint('second')")
    agent, events = make_agent([reply, "done"], sandbox)
    agent.chat("go")
    assert sandbox.run("counter").output.strip() == "1"
    assert "first" in agent._llm.prompts[1] and "second\n" not in agent._llm.prompts[1].split("environment")[-1]


@pytest.mark.parametrize("body,expect", [
    ('{"name": "Adder", "parameters": {a: 1}}', "not valid"),
    ('{"parameters": {"a": 1}}', '"name"'),
    ('["Adder"]', '"name"'),
    ('{"name": "Adder", "parameters": [1, 2]}', '"parameters" must be a JSON object'),
])
def test_invalid_json_is_explained_and_the_run_continues(body, expect):
    good = PLUGIN.format('{"name": "Adder", "arguments": "{\\"a\\": 2, \\"b\\": 2}"}')
    agent, events = make_agent(["try" + PLUGIN.format(body), "again" + good, "The sum is 4."])
    ret = agent.chat("2+2?")
    assert ret.response == "The sum is 4." and ret.errmsg is None
    err = next(e for e in events if e["event"] == "protocol_error")
    assert expect in err["problem"] and "available tools: Adder" in err["problem"]
    assert expect in agent._llm.prompts[1]  # the model was told
    assert any(e["event"] == "action" and '"sum": 4' in e["response"] for e in events)


def test_unknown_tool_is_named_with_the_available_ones():
    agent, events = make_agent(["x" + PLUGIN.format('{"name": "get_weather", "parameters": {}}'), "ok"])
    agent.chat("weather?")
    problem = next(e for e in events if e["event"] == "protocol_error")["problem"]
    assert "'get_weather'" in problem and "Adder" in problem
    assert "there is no tool named 'get_weather'" in agent._llm.prompts[1]


def test_wrong_arguments_reach_the_model_as_the_tool_error():
    agent, events = make_agent(["x" + PLUGIN.format('{"name": "Adder", "parameters": {"a": 1, "c": 2}}'), "ok"])
    agent.chat("add")
    action = next(e for e in events if e["event"] == "action")
    assert action["state"] != 0 and "unknown arguments" in action["response"]


def test_calls_to_missing_channels_and_malformed_markers():
    agent, events = make_agent(["x" + CODE.format("1+1"), "y<|action_start|>\nprint(1)<|action_end|>", "fine"],
                               sandbox=None, plugins=False)
    ret = agent.chat("q")
    problems = [e["problem"] for e in events if e["event"] == "protocol_error"]
    assert "interpreter is not available" in problems[0] and "must start with" in problems[1]
    assert ret.response == "fine"


def test_endless_bad_replies_stop_at_max_turns():
    agent, events = make_agent(["x" + PLUGIN.format("{broken")] * 3, max_turn=3)
    ret = agent.chat("q")
    assert ret.errmsg == "stopped after 3 turns without a final answer" and ret.response == ""
    assert sum(e["event"] == "protocol_error" for e in events) == 3 and events[-1]["event"] == "max_turns"


def test_model_failure_ends_the_run_cleanly():
    agent, events = make_agent(["x" + PLUGIN.format('{"name": "Adder", "parameters": {"a": 1, "b": 1}}')])
    ret = agent.chat("q")  # the recording runs out on turn 2: the model errors
    assert ret.errmsg and "only 1 replies" in ret.errmsg
    assert events[-1]["event"] == "model_error"


def test_answer_text_is_cut_at_im_end_and_stray_markers_removed():
    reply = HardenedInternlm2Protocol().parse_reply("The answer is 4.<|action_end|><|im_end|>\nuser: more")
    assert reply.kind == "answer" and reply.thought == "The answer is 4."


def test_lagent_compatible_parse_never_raises():
    p = HardenedInternlm2Protocol()
    execs = ActionExecutor([Adder()])
    two = "t" + PLUGIN.format('{"name": "Adder", "parameters": {"a": 1, "b": 2}}') * 2
    assert p.parse(two, execs)[0] == "plugin"
    assert p.parse("t" + PLUGIN.format("{bad"), execs) == (None, "t", None)


def test_extract_code_from_fences():
    assert extract_code("```python\na = 1\n```\ntext\n```python\nb = 2\n```") == "a = 1\nb = 2"
    assert extract_code("print(1)") == "print(1)"
    assert extract_code("```python\nx = 1\n") == "x = 1"  # unterminated fence (reply cut by max tokens)


def test_long_output_is_shortened_for_the_model_but_kept_whole_for_the_transcript(sandbox):
    cells = []
    interp = ActionExecutor([SandboxInterpreter(sandbox, on_cell=lambda code, r: cells.append(r),
                                                observation_chars=1000)])
    replies = ["x" + CODE.format("print('A' * 6000 + 'END')"), "done"]
    agent = PuyuAgent(ReplayModel(replies), interpreter_executor=interp)
    agent.chat("q")
    observation = agent._llm.prompts[1].split("environment name=<|interpreter|>\n")[1]
    assert "characters omitted" in observation and "END" in observation and len(observation) < 1200
    assert cells[0].output.strip() == "A" * 6000 + "END"
