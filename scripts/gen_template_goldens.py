#!/usr/bin/env python3
"""Generates chat-template golden cases with the real jinja2, configured exactly as transformers'
apply_chat_template configures it (transformers' own compile and render helpers are used).

Writes tests/golden/templates/:
  <family>.jinja                 the real chat templates (qwen3, mistral-nemo, deepseek-v3, smollm2)
  cases/<case>.json              the inputs: either a chat ("messages", "tools", "add_generation_prompt",
                                 "bos_token", "eos_token", "extra") rendered as apply_chat_template does,
                                 or raw template variables ("variables") for feature templates, whose
                                 source is inline ("source"). "now_unix" fixes strftime_now's clock.
  cases/<case>.expected          the exact rendered bytes, or
  cases/<case>.error             jinja2's error message (checked as a substring when
                                 "match_error" is true in the case; otherwise only failure is required)

Run: .venv/bin/python scripts/gen_template_goldens.py
     .venv/bin/python scripts/gen_template_goldens.py --bench   (jinja2 render times, no files written)
"""
import json
import os
import shutil
import sys
from datetime import datetime

from transformers.utils.chat_template_utils import _cached_compile_jinja_template, render_jinja_template

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "golden", "templates")
CASES = os.path.join(OUT, "cases")
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "tokenizers")
NOW_UNIX = 1715000000


def load_family_templates():
    families = {}
    for name in ("qwen3", "mistral-nemo", "deepseek-v3"):
        cfg = json.load(open(os.path.join(SHARED, name, "tokenizer_config.json")))

        def token(key):
            v = cfg.get(key)
            return v.get("content") if isinstance(v, dict) else v

        families[name] = (cfg["chat_template"], token("bos_token"), token("eos_token"))
        with open(os.path.join(OUT, name + ".jinja"), "w") as f:
            f.write(cfg["chat_template"])
    # SmolLM2's template comes from the GGUF (tokenizer.chat_template); a copy lives in the golden
    # dir so that tests do not need the model file. Refresh it when the model is present.
    gguf_path = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
    smol_path = os.path.join(OUT, "smollm2.jinja")
    if os.path.exists(gguf_path):
        import gguf

        field = gguf.GGUFReader(gguf_path).fields["tokenizer.chat_template"]
        with open(smol_path, "w") as f:
            f.write(bytes(field.parts[field.data[0]]).decode())
    families["smollm2"] = (open(smol_path).read(), "<|im_start|>", "<|im_end|>")
    return families


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. \"Paris\""},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "default": 1.0},
            },
            "required": ["city"],
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {"name": "search", "description": "Web search — returns snippets.",
                 "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}},
}


def tool_call(args, call_id="call00001", name="get_weather"):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


CHATS = {
    "single": [{"role": "user", "content": "Hello!"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    "multi_turn": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi, who are you?"},
        {"role": "assistant", "content": "I am an assistant."},
        {"role": "user", "content": "Tell me a joke about \"quotes\" and 'apostrophes'.\nTwo lines\\backslash."},
    ],
    "unicode": [
        {"role": "user", "content": "Grüße 👋 — 你好 \u2028 tab\there"},
        {"role": "assistant", "content": "Ça va ✓"},
        {"role": "user", "content": "  padded  \n\n"},
    ],
    "tools_dict_args": [
        {"role": "system", "content": "Use tools when needed."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None,
         "tool_calls": [tool_call({"city": "Paris", "unit": "celsius", "days": 2, "ratio": 0.5, "flag": True, "none": None})]},
        {"role": "tool", "tool_call_id": "call00001", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": "It is 21°C in Paris."},
    ],
    "tools_string_args": [
        {"role": "user", "content": "Weather in Paris and search news?"},
        {"role": "assistant", "content": None,
         "tool_calls": [tool_call("{\"city\": \"Paris\"}"),
                        tool_call("{\"q\": \"news \\\"today\\\"\"}", call_id="call00002", name="search")]},
        {"role": "tool", "tool_call_id": "call00001", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call00002", "content": "nothing new"},
    ],
    "tools_with_text": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "Checking.",
         "tool_calls": [tool_call({"city": "Oslo", "nested": {"list": [1, 2.5, "é"]}}, call_id="abc123XYZ")]},
        {"role": "tool", "tool_call_id": "abc123XYZ", "content": "<tool_response>cold</tool_response>"},
        {"role": "tool", "tool_call_id": "abc123XYZ", "content": "second result"},
        {"role": "assistant", "content": "<think>\nit is cold\n</think>\n\nCold."},
    ],
    "thinking": [
        {"role": "user", "content": "Think first: 3*7?"},
        {"role": "assistant", "content": "<think>\n3*7 is 21.\n</think>\n\n21"},
        {"role": "user", "content": "And 4*5?"},
    ],
    "reasoning_field": [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "reasoning_content": "R1 reasoning"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2", "reasoning": "R2 reasoning"},
    ],
    "bad_alternation": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
}
TOOLS_FOR = {"tools_dict_args": [WEATHER_TOOL], "tools_string_args": [WEATHER_TOOL, SEARCH_TOOL],
             "tools_with_text": [WEATHER_TOOL, SEARCH_TOOL]}


# Error cases whose message dyn words differently (syntax errors); only failure is checked.
UNMATCHED_ERRORS = {"feature_error_unterminated"}


def write_case(name, case, render):
    os.makedirs(CASES, exist_ok=True)
    try:
        out, error = render(), None
    except Exception as e:  # noqa: BLE001 - any template error is a golden outcome
        out, error = None, str(e)
        if name not in UNMATCHED_ERRORS:
            case["match_error"] = True
    with open(os.path.join(CASES, name + ".json"), "w") as f:
        json.dump(case, f, ensure_ascii=False, indent=1)
        f.write("\n")
    if error is None:
        with open(os.path.join(CASES, name + ".expected"), "w", newline="") as f:
            f.write(out)
    else:
        with open(os.path.join(CASES, name + ".error"), "w") as f:
            f.write(error)


def chat_cases(families):
    n = 0
    for family, (source, bos, eos) in families.items():
        for chat_name, messages in CHATS.items():
            tools = TOOLS_FOR.get(chat_name)
            extras = [{}]
            if "enable_thinking" in source:
                extras = [{}, {"enable_thinking": False}, {"enable_thinking": True}]
            for gen in (True, False):
                for extra in extras:
                    if not gen and extra:
                        continue
                    suffix = "_gen" if gen else "_nogen"
                    if extra:
                        suffix += "_think" if extra["enable_thinking"] else "_nothink"
                    case = {"template": family + ".jinja", "messages": messages, "tools": tools,
                            "add_generation_prompt": gen, "bos_token": bos, "eos_token": eos, "extra": extra}
                    kwargs = dict(extra)
                    if bos is not None:
                        kwargs["bos_token"] = bos
                    if eos is not None:
                        kwargs["eos_token"] = eos

                    def render(messages=messages, tools=tools, gen=gen, kwargs=kwargs):
                        rendered, _ = render_jinja_template(conversations=[messages], tools=tools, chat_template=source,
                                                            add_generation_prompt=gen, **kwargs)
                        return rendered[0]

                    write_case(f"{family}_{chat_name}{suffix}", case, render)
                    n += 1
    return n


# Feature templates: (name, source, variables[, match_error]).
FEATURES = [
    ("ws_trim_lstrip", "A\n  {% if true %}\n    x\n  {% endif %}\nB\n{# c #}\n  {{ 'v' }}  \n", {}),
    ("ws_minus", "a  \n {%- if true -%}  \n b \n {%- endif %}\n c {{- ' d ' -}} e", {}),
    ("ws_plus", "a\n  {%+ if true +%}\nb\n  {% endif %}\n", {}),
    ("ws_comment_minus", "x {#- c -#} y\n  {# c #}\nz", {}),
    ("ws_trailing_newline", "line\n\n", {}),
    ("ws_crlf", "a\r\n{% if true %}\r\nb\r\n{% endif %}\r\nc", {}),
    ("raw_block", "{% raw %}{{ not parsed }} {% if %}{% endraw %}|\n  {% raw -%}  x  {%- endraw %}", {}),
    ("literals", "{{ 1 }} {{ -2 }} {{ 1.5 }} {{ 1e-5 }} {{ 1e16 }} {{ 12345678.9 }} {{ 0.1 + 0.2 }} {{ 'a\\n\\t\\'b\\u00e9' }} "
     "{{ \"q\" }} {{ true }} {{ False }} {{ none }} {{ [1, 'a', none, true, 2.0] }} {{ (1,) }} {{ (1, 'b') }} "
     "{{ {'k': 1, 'j': [1, {'x': 'y'}]} }} {{ 1_000 }} {{ 0x1f }} {{ 'ab' 'cd' }}", {}),
    ("arith", "{{ 7 + 2 }} {{ 7 - 10 }} {{ 7 * 3 }} {{ 7 / 2 }} {{ 8 / 2 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} "
     "{{ -7 % 3 }} {{ 7.5 // 2 }} {{ -7.5 % 2 }} {{ 2 ** 10 }} {{ 2 ** -1 }} {{ 2 ** 3 ** 2 }} {{ 'a' ~ 1 ~ none ~ u }} "
     "{{ 'ab' * 3 }} {{ [1] * 2 + [3] }} {{ -x }} {{ +x }} {{ 1 + 2.5 }} {{ true + 1 }}", {"x": 4}),
    ("compare", "{{ 1 < 2 < 3 }} {{ 3 > 2 > 2 }} {{ 1 == 1.0 }} {{ 'a' != 'b' }} {{ [1,2] == [1,2] }} {{ 'b' >= 'a' }} "
     "{{ 'ell' in 'hello' }} {{ 2 in [1,2] }} {{ 'k' in {'k': 1} }} {{ 3 not in [1] }} {{ none == none }} "
     "{{ u == none }} {{ (1, 2) < (1, 3) }}", {}),
    ("logic", "{{ 0 or 'x' }} {{ 'a' and 'b' }} {{ '' and 'b' }} {{ not 0 }} {{ not x is defined }} "
     "{{ 'y' if x else 'n' }} {{ 'y' if u else 'n' }} [{{ 'y' if false }}] {{ 1 if false else 2 if true else 3 }}", {"x": 1}),
    ("access", "{{ d.a }} {{ d['b'][1] }} {{ d.b[-1] }} {{ l[0] }} {{ l[-1] }} [{{ l[10] }}] [{{ d.missing }}] "
     "{{ s[1] }} {{ s[-1] }} {{ d.get('a') }} {{ d.get('zz', 'dflt') }} {{ d.get('zz') }} {{ l.0 }} {{ d['items'] }}",
     {"d": {"a": 1, "b": [2, 3], "items": "key-not-method"}, "l": [5, 6, 7], "s": "héllo"}),
    ("slices", "{{ l[1:] }} {{ l[:2] }} {{ l[::-1] }} {{ l[-2:] }} {{ l[::2] }} {{ l[5:] }} {{ s[1:3] }} {{ s[::-1] }} "
     "{{ s[:-1] }} {{ l[1:-1] }} {{ l[-100:100] }} {{ l[3:0:-1] }}", {"l": [0, 1, 2, 3, 4], "s": "añbc"}),
    ("for_loop_vars", "{% for x in items %}{{ loop.index }}/{{ loop.index0 }}/{{ loop.revindex }}/{{ loop.revindex0 }}/"
     "{{ loop.first }}/{{ loop.last }}/{{ loop.length }}/{{ loop.previtem }}/{{ loop.nextitem }}/{{ loop.cycle('a','b') }};"
     "{% endfor %}", {"items": ["x", "y", "z"]}),
    ("for_else_filter", "{% for x in items if x > 1 %}{{ x }}:{{ loop.length }},{% else %}empty{% endfor %}|"
     "{% for x in [] %}x{% else %}none{% endfor %}|{% for x in u %}x{% else %}undef{% endfor %}", {"items": [1, 2, 3]}),
    ("for_unpack", "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{% for a, b in [[1, 2], (3, 4)] %}{{ a + b }}{% endfor %}"
     "{% for k in d %}{{ k }}{% endfor %}{% for c in 'héy' %}[{{ c }}]{% endfor %}", {"d": {"x": 1, "y": [2]}}),
    ("for_break_continue", "{% for i in range(10) %}{% if i == 2 %}{% continue %}{% endif %}{% if i > 5 %}{% break %}{% endif %}{{ i }}{% endfor %}", {}),
    ("for_nested_loop", "{% for a in [1, 2] %}{% for b in 'xy' %}{{ loop.index }}{{ b }}{{ a }} {% endfor %}{{ loop.index }}|{% endfor %}", {}),
    ("for_recursive", "{% for n in tree recursive %}({{ n.name }}{{ loop.depth }}{% if n.children %}{{ loop(n.children) }}{% endif %}){% endfor %}",
     {"tree": [{"name": "a", "children": [{"name": "b", "children": []}, {"name": "c"}]}, {"name": "d"}]}),
    ("scoping", "{% set x = 1 %}{% for i in range(3) %}{% set x = x + i %}{{ x }}{% endfor %}|{{ x }}|"
     "{% if true %}{% set y = 5 %}{% endif %}{{ y }}|{% for i in range(2) %}{% if i == 0 %}{% set z = 'a' %}{% endif %}[{{ z }}]{% endfor %}", {}),
    ("set_forms", "{% set a, b = 1, 2 %}{{ a }}{{ b }}{% set t = 1, 2 %}{{ t }}{% set blk %}inner {{ a }}{% endset %}[{{ blk }}]"
     "{% set up | upper %}shout{% endset %}{{ up }}{% set ns = namespace(n=0, items=[]) %}{% for i in range(4) %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }}", {}),
    ("namespace_dict", "{% set ns = namespace({'a': 1}, b=2) %}{{ ns.a }}{{ ns.b }}{% set d = dict(x=1, y='z') %}{{ d }}{{ dict([('k', 'v')]) }}", {}),
    ("macros", "{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('Bo') }} {{ greet('Al', punct='?') }} "
     "{% macro rec(n) %}{% if n > 0 %}{{ n }}{{ rec(n - 1) }}{% endif %}{% endmacro %}{{ rec(4) }} "
     "{% macro va() %}{{ varargs }}{{ kwargs }}{% endmacro %}{{ va(1, 2, k=3) }}", {}),
    ("call_block", "{% macro wrap(tag) %}<{{ tag }}>{{ caller() }}</{{ tag }}>{% endmacro %}{% call wrap('b') %}bold {{ 1 + 1 }}{% endcall %}"
     "{% macro each(items) %}{% for i in items %}{{ caller(i) }}{% endfor %}{% endmacro %}{% call(x) each([1, 2]) %}[{{ x }}]{% endcall %}", {}),
    ("filter_block", "{% filter upper %}hello {{ name }}{% endfilter %}|{% filter trim | replace('a', 'o') %}  banana  {% endfilter %}", {"name": "bob"}),
    ("filters_string", "{{ ' Ab c '|trim }}|{{ 'xxhixx'|trim('x') }}|{{ 'hello world'|title }}|{{ 'hELLO'|capitalize }}|{{ 'abc'|upper }}|"
     "{{ 'ÀÉ'|lower }}|{{ 'aaa'|replace('a', 'b', 2) }}|{{ 'a&<>\"\\''|e }}|{{ 'one two  three'|wordcount }}|{{ 'abc'|reverse }}|"
     "{{ 'x'|center(5) }}|{{ 'a-b c(d'|title }}|{{ 42|string }}|{{ [1, 'a']|string }}|{{ u|string }}|{{ 'abc'|length }}|{{ 'héllo'|count }}", {}),
    ("filters_list", "{{ l|first }} {{ l|last }} {{ l|join(', ') }} {{ l|length }} {{ l|sort }} {{ l|sort(reverse=true) }} {{ l|unique|list }} "
     "{{ l|reverse|list }} {{ l|sum }} {{ l|min }} {{ l|max }} {{ l|select('odd')|list }} {{ l|reject('odd')|list }} "
     "{{ l|map('string')|join('-') }} {{ l|batch(2)|list }} {{ [3.5, -1]|map('abs')|list }} {{ ['b', 'A', 'c']|sort }} "
     "{{ ['b', 'A', 'c']|sort(case_sensitive=true) }} {{ ['a', 'A', 'b']|unique|list }} {{ 'abc'|list }} {{ []|first }}", {"l": [3, 1, 2, 3]}),
    ("filters_attr", "{{ users|map(attribute='name')|join(',') }} {{ users|selectattr('admin')|map(attribute='name')|list }} "
     "{{ users|rejectattr('admin')|map(attribute='name')|list }} {{ users|selectattr('name', 'equalto', 'b')|list|length }} "
     "{{ users|sort(attribute='age')|map(attribute='name')|join }} {{ users|sum(attribute='age') }} {{ users|map(attribute='x', default='?')|join }} "
     "{{ users|map(attribute='tags.0')|list }} {{ users|max(attribute='age') }} {{ users|join(',', attribute='name') }}",
     {"users": [{"name": "a", "age": 30, "admin": True, "tags": ["t1"]}, {"name": "b", "age": 20, "admin": False, "tags": ["t2"]}]}),
    ("filters_dict", "{{ d|items|list }} {{ d|dictsort }} {{ d|dictsort(by='value', reverse=true) }} {{ d|length }} {{ d|list }} "
     "{{ d.keys()|list }} {{ d.values()|list }} {{ d|tojson }}", {"d": {"b": 2, "a": 3, "C": 1}}),
    ("filters_numbers", "{{ -3|abs }} {{ 2.567|round(2) }} {{ 2.5|round }} {{ 3.5|round }} {{ 7|round }} {{ 2.1|round(0, 'ceil') }} "
     "{{ 2.9|round(method='floor') }} {{ '42'|int }} {{ ' 7 '|int }} {{ '4.7'|int }} {{ 'x'|int }} {{ 'x'|int(5) }} {{ 3.9|int }} "
     "{{ '2.5'|float }} {{ 'nan?'|float }} {{ 3|float }} {{ '0x1A'|int(0, 16) }} {{ 1.005|round(2) }}", {}),
    ("filters_default", "{{ u|default('d') }} {{ ''|default('d') }} {{ ''|default('d', true) }} {{ none|d('x') }} {{ 0|d('z', boolean=true) }} "
     "{{ v|default('d') }}", {"v": "val"}),
    ("filter_indent", "[{{ text|indent }}] [{{ text|indent(2, true) }}] [{{ text|indent('> ', first=true, blank=true) }}]", {"text": "a\n\nb\nc\n"}),
    ("tojson", "{{ v|tojson }}\n{{ v|tojson(indent=2) }}\n{{ v|tojson(indent=2, sort_keys=true) }}\n{{ v|tojson(separators=(',', ':')) }}\n"
     "{{ s|tojson }}\n{{ s|tojson(ensure_ascii=true) }}\n{{ []|tojson(indent=2) }}{{ {}|tojson }}{{ 1.0|tojson }}{{ 1e-7|tojson }}{{ none|tojson }}",
     {"v": {"z": 1, "a": [True, None, 1.5, "x", {}, []], "n": {"k": -2}}, "s": "é\"\\\n\t\u0001😀</"}),
    ("tests", "{{ u is defined }} {{ u is undefined }} {{ none is none }} {{ 'a' is string }} {{ 1 is number }} {{ true is number }} "
     "{{ 1 is integer }} {{ true is integer }} {{ 1.0 is float }} {{ {} is mapping }} {{ [] is iterable }} {{ 'a' is sequence }} "
     "{{ true is boolean }} {{ true is true }} {{ 0 is false }} {{ false is false }} {{ range is callable }} {{ 4 is even }} {{ 3 is odd }} "
     "{{ 9 is divisibleby 3 }} {{ 9 is divisibleby(2) }} {{ 1 is eq 1 }} {{ 'a' is equalto 'a' }} {{ 1 is ne 2 }} {{ 1 is lt 2 }} "
     "{{ 2 is gt 1 }} {{ 1 is le 1 }} {{ 1 is ge 2 }} {{ 2 is in [1, 2] }} {{ none is sameas none }} {{ 'abc' is lower }} {{ 'ABC' is upper }} "
     "{{ 1 is not string }} {{ x is not none }}", {"x": 0}),
    ("str_methods", "{{ s.strip() }}|{{ s.lstrip() }}|{{ s.rstrip() }}|{{ 'xxaxx'.strip('x') }}|{{ 'a,b,,c'.split(',') }}|{{ ' a  b '.split() }}|"
     "{{ 'a,b,c'.split(',', 1) }}|{{ 'hello'.startswith('he') }}|{{ 'hello'.endswith(('x', 'lo')) }}|{{ 'Hello World'.upper() }}|"
     "{{ 'Hello'.lower() }}|{{ 'hello world'.title() }}|{{ 'hELLO'.capitalize() }}|{{ 'aXa'.replace('a', 'b') }}|{{ 'hello'.find('l') }}|"
     "{{ 'hello'.count('l') }}|{{ '-'.join(['a', 'b']) }}|{{ 'a1'.isalnum() }}|{{ '12'.isdigit() }}|{{ 'a\\nb'.splitlines() }}|"
     "{{ 'x</think>y'.split('</think>')[-1] }}|{{ 'a b c'.rsplit(' ', 1) }}", {"s": "  pad  "}),
    ("strftime", "{{ strftime_now('%Y-%m-%d %H:%M') }} {{ strftime_now('%d %B %Y') }}", {}, False, NOW_UNIX),
    ("raise", "{% if x %}{{ raise_exception('Bad role: ' ~ x) }}{% endif %}ok", {"x": "tool"}, True),
    ("error_undefined_attr", "{{ u.x }}", {}),
    ("error_unknown_filter", "{{ 1|nope }}", {}),
    ("error_concat_type", "{{ 'a' + 1 }}", {}),
    ("error_unterminated", "{% if x %}never closed", {}),
    ("error_unsafe_mutation", "{% set l = [1] %}{{ l.append(2) }}", {}),
    ("error_range_sandbox", "{{ range(100001)|length }}", {}),
    ("dunder_blocked", "[{{ x.__class__ }}][{{ ''.__class__ }}]", {"x": {"a": 1}}),
    ("generation_tag", "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}!{% endgeneration %}{% else %}{{ m.content }}{% endif %}|{% endfor %}",
     {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}),
    ("with_block", "{% with a = 1, b = 'x' %}{{ a }}{{ b }}{% endwith %}[{{ a }}]", {}),
    ("print_values", "{{ d }} {{ l }} {{ 'it\\'s' }} {{ ['it\\'s', \"q\\\"\", 'both\\'\"'] }} {{ {'k': none, 1: true} }} {{ 1.0 }} {{ 100.0 / 3 }} "
     "{{ 2.0 ** 70 }} {{ [0.1, 1e-10, 1e22, -0.0] }}", {"d": {"x": "y", "n": [1, 2.5]}, "l": ["é", "\n"]}),
    ("loop_changed", "{% for x in [1, 1, 2, 2, 3] %}{% if loop.changed(x) %}{{ x }}{% endif %}{% endfor %}", {}),
    ("ns_in_macro", "{% set ns = namespace(c=0) %}{% macro bump() %}{% set ns.c = ns.c + 1 %}{% endmacro %}{{ bump() }}{{ bump() }}{{ ns.c }}", {}),
]


def feature_cases():
    for entry in FEATURES:
        name, source, variables = entry[:3]
        match_error = entry[3] if len(entry) > 3 else False
        now = entry[4] if len(entry) > 4 else None
        case = {"source": source, "variables": variables}
        if match_error:
            case["match_error"] = True
        if now is not None:
            case["now_unix"] = now

        def render(source=source, variables=variables, now=now):
            compiled = _cached_compile_jinja_template(source)
            if now is not None:
                compiled.environment.globals["strftime_now"] = lambda fmt: datetime.fromtimestamp(now).strftime(fmt)
            return compiled.render(**variables)

        write_case("feature_" + name, case, render)
    return len(FEATURES)


def bench():
    """Times jinja2 render only (template compiled once), for docs/benchmarks/chat_template.md;
    the same inputs as dyn's template_bench."""
    import timeit

    for family in ("qwen3", "mistral-nemo", "deepseek-v3", "smollm2"):
        source = open(os.path.join(OUT, family + ".jinja")).read()
        compiled = _cached_compile_jinja_template(source)
        for chat in ("multi_turn", "tools_with_text"):
            case = json.load(open(os.path.join(CASES, f"{family}_{chat}_gen.json")))
            kwargs = dict(case["extra"])
            for key in ("bos_token", "eos_token"):
                if case[key] is not None:
                    kwargs[key] = case[key]

            def run():
                return compiled.render(messages=case["messages"], tools=case["tools"], documents=None,
                                       add_generation_prompt=True, **kwargs)

            n, total = timeit.Timer(run).autorange()
            best = min(timeit.repeat(run, number=n, repeat=5)) / n
            print(f"{family:13s} {chat:16s} {best * 1e6:9.1f} us  ({len(run())} bytes)")


def main():
    if "--bench" in sys.argv:
        return bench()
    os.makedirs(OUT, exist_ok=True)
    if os.path.isdir(CASES):
        shutil.rmtree(CASES)
    families = load_family_templates()
    n = chat_cases(families)
    m = feature_cases()
    print(f"wrote {n} chat cases and {m} feature cases to {CASES}")


if __name__ == "__main__":
    sys.exit(main())
