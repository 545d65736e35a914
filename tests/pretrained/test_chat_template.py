"""Chat templates rendered without transformers must equal transformers' apply_chat_template(...,
tokenize=False), and the end-of-turn tokens must come from the tokenizer and generation configs."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from tiny_pretrained import CHATML, hf_tokenizer, tiny_tokenizer  # noqa: E402

from longmem.pretrained.chat_template import (ChatTemplateError, end_of_turn, render_chat,  # noqa: E402
                                              template_variables)

pytestmark = pytest.mark.parity

# Qwen2.5's template (shortened tool text): a default system prompt, tools serialised with tojson.
QWEN = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud.' }}\n"
    "    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools><|im_end|>\\n\" }}\n{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if not (message.role == 'system' and loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- endif %}\n"
    "{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n")
# Meta Llama 3 Instruct's template.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
          "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Mistral-style: refuses roles that do not alternate; a namespace, a loop break and strftime_now.
MISTRAL = ("{{ bos_token }}{% set ns = namespace(n=0) %}{% for message in messages %}"
           "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% set ns.n = ns.n + 1 %}{% if ns.n > 6 %}{% break %}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
           "{{ ' (' + strftime_now('%Y') + ')' }}")

SYSTEM_CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital of France?"},
               {"role": "assistant", "content": "  Paris.  "}, {"role": "user", "content": "Und Deutschland? Ünïcödé ✓"}]
USER_CHAT = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Count: 1, 2, 3"}]
TOOLS = [{"type": "function", "function": {"name": "météo", "description": "Wetter für <Ort> & \"Zeit\"",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("template", [CHATML, QWEN, LLAMA3], ids=["smollm2-chatml", "qwen2.5", "llama3"])
@pytest.mark.parametrize("messages", [SYSTEM_CHAT, USER_CHAT], ids=["system", "no-system"])
@pytest.mark.parametrize("gen", [True, False])
def test_render_equals_transformers(tok, template, messages, gen):
    hf = hf_tokenizer(tok, chat_template=template)
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    special = template_variables({"bos_token": hf.bos_token, "eos_token": hf.eos_token, "unk_token": hf.unk_token,
                                  "pad_token": hf.pad_token})
    got = render_chat(template, messages, add_generation_prompt=gen, **special)
    assert got == want
    assert messages[-1]["content"] in got


def test_tools_tojson_and_helpers_equal_transformers(tok):
    hf = hf_tokenizer(tok, chat_template=QWEN)
    want = hf.apply_chat_template(USER_CHAT, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    got = render_chat(QWEN, USER_CHAT, tools=TOOLS)
    assert got == want and '"météo"' in got and "<Ort> & \\\"Zeit\\\"" in got     # no ASCII or HTML escaping
    long_chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(9)]
    hf = hf_tokenizer(tok, chat_template=MISTRAL)
    want = hf.apply_chat_template(long_chat, tokenize=False)
    got = render_chat(MISTRAL, long_chat, add_generation_prompt=False, bos_token=hf.bos_token, eos_token=hf.eos_token)
    assert got == want and "m5" in got and "m6" not in got                # the loop broke after six turns


def test_template_errors_are_value_errors():
    with pytest.raises(ChatTemplateError, match="refused these messages: Conversation roles must alternate"):
        render_chat(MISTRAL, [{"role": "assistant", "content": "x"}], bos_token="<s>", eos_token="</s>")
    with pytest.raises(ValueError, match="does not parse"):
        render_chat("{% for m in messages %}", USER_CHAT)
    with pytest.raises(ValueError, match="message 1 must be a dict with a string 'role'"):
        render_chat(CHATML, [{"role": "user", "content": "a"}, {"content": "no role"}])
    with pytest.raises(ValueError, match="messages must be a list"):
        render_chat(CHATML, "hello")


def test_sandbox_blocks_python_internals_and_mutation():
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(ValueError, match="sandbox forbids"):
        render_chat("{{ ''.__class__.__mro__[1].__subclasses__() }}", messages)
    with pytest.raises(ValueError, match="sandbox forbids"):
        render_chat("{% set x = messages.append({'role': 'evil'}) %}", messages)
    with pytest.raises(ValueError, match="sandbox forbids"):
        render_chat("{% set ns = namespace() %}{% set ns._x = 1 %}", messages)
    assert messages == [{"role": "user", "content": "x"}]


def test_end_of_turn_tokens(tok):
    from tokenizers import AddedToken
    assert end_of_turn(tok, {"eos_token": "<|im_end|>", "chat_template": CHATML}, {"eos_token_id": 2}).ids == (2,)
    llama = tiny_tokenizer()
    llama.add_special_tokens([AddedToken(t, special=True) for t in
                              ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                               "<|eot_id|>")])
    eot, end = llama.token_to_id("<|eot_id|>"), llama.token_to_id("<|end_of_text|>")
    stop = end_of_turn(llama, {"eos_token": "<|end_of_text|>", "chat_template": LLAMA3}, {})
    assert stop.ids == (end, eot) and stop.strings == ("<|end_of_text|>", "<|eot_id|>")
    stop = end_of_turn(llama, {"eos_token": "<|end_of_text|>", "chat_template": LLAMA3}, {"eos_token_id": [eot, end]})
    assert stop.ids == (eot, end)
    # without a template, only the configured end-of-sequence tokens stop
    assert end_of_turn(llama, {"eos_token": "<|end_of_text|>"}, {}).ids == (end,)


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_turns_rendered_one_at_a_time_add_up_to_the_whole_conversation(system):
    """What a chat with memory feeds, turn after turn (user turn, the reply, its stop string, the closing
    text), is exactly one rendering of the whole conversation."""
    from longmem.pretrained.chat_template import TurnRenderer, render_chat
    turns = [("Hi there", "Hello!"), ("What is 2+2?", "4."), ("And 3+3?", "6.")]
    r = TurnRenderer(CHATML, system=system)
    fed = ""
    for i, (user, reply) in enumerate(turns):
        fed += r.user_turn(user, first=i == 0) + reply + "<|im_end|>" + r.closing("<|im_end|>")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    assert fed == render_chat(CHATML, messages, add_generation_prompt=False)
    assert r.closing(None) == "<|im_end|>\n"                      # a reply cut at the token limit is closed
