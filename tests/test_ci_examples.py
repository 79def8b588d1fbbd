"""The CI examples in docs/examples: the GitLab file is valid YAML with the jobs and rules the docs
describe, the Jenkinsfile is a well-formed declarative pipeline, and every `llamaboard-portal`
command line in either file parses with the CLI's real argument parser.

No GitLab or Jenkins runs here. The Jenkinsfile is checked by a small tokenizer (comments and
strings skipped, brackets balanced, blocks named), not by Groovy: slashy strings, GStrings'
${...} and closures with parameters are not understood, and the example uses none of them.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from portal.cli import build_parser

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
GITLAB = EXAMPLES / ".gitlab-ci.yml"
JENKINS = EXAMPLES / "Jenkinsfile"

# the shell variables the examples' command lines use, with sample values; any other
# variable in a command line fails the test (a typo there would reach the CLI as is)
SAMPLES = {
    "PORTAL_URL": "https://llm.example.com",
    "CHANGED": "experiments/demo_alpaca/tiny-llama/lora_a.yaml experiments/b.yml",
    "config": "experiments/demo_alpaca/tiny-llama/lora_a.yaml",
    "name": "lora_a-p12",
    "TRAIN_TIMEOUT": "21600",
}
COMMAND = re.compile(r"(?:^|[\s;&|(])(?:[\w.$/-]*/)?llamaboard-portal\s+(.*)$")
VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


# ---- shell command lines -------------------------------------------------------------------

def command_lines(script: str) -> list[str]:
    """The arguments of every `llamaboard-portal ...` in a shell script (continued lines joined,
    comment lines and the text after `||`/`&&`/`;`/`|` left out)."""
    found = []
    for line in script.replace("\\\n", " ").splitlines():
        if line.strip().startswith("#"):
            continue
        match = COMMAND.search(line)
        if match:
            found.append(re.split(r"\s*;|\s(?:\|\||&&|\|)\s", match.group(1))[0].strip())
    return found


def substitute(args: str) -> str:
    if "$(" in args or "`" in args:
        raise AssertionError(f"command substitution in a CLI command line: {args}")

    def sample(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in SAMPLES, f"unknown shell variable ${name} in: {args}"
        return SAMPLES[name]
    return VARIABLE.sub(sample, args)


def parse(args: str):
    try:
        return build_parser().parse_args(shlex.split(substitute(args)))
    except SystemExit as exc:  # argparse prints the problem to stderr
        raise AssertionError(f"the CLI's parser refuses: llamaboard-portal {args}") from exc


def check_remote_commands(commands: list[str], where: str) -> None:
    parsed = [parse(c) for c in commands]
    assert {a.command for a in parsed} >= {"validate", "submit"}, f"{where}: {commands}"
    for args in parsed:
        if args.command in ("validate", "submit", "runs", "logs", "cancel"):
            assert args.server == SAMPLES["PORTAL_URL"] and args.token_env == "PORTAL_TOKEN", args
        if args.command == "validate":
            assert len(args.files) == len(SAMPLES["CHANGED"].split())
        if args.command == "submit":
            assert args.wait and args.timeout == float(SAMPLES["TRAIN_TIMEOUT"]) and args.name, args
            assert not args.dry_run and args.launcher is None


def assert_shell_syntax(script: str, where: str) -> None:
    """`sh -n`: the script parses as a POSIX shell script (nothing is run)."""
    result = subprocess.run(["sh", "-n"], input=script, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{where}: {result.stderr}"


def test_the_command_line_extraction_finds_commands_and_the_parser_refuses_bad_ones():
    script = "# llamaboard-portal submit ignored\nx || .cli/bin/llamaboard-portal validate --server \"$PORTAL_URL\" a.yaml || status=$?"
    assert command_lines(script) == ['validate --server "$PORTAL_URL" a.yaml']
    with pytest.raises(AssertionError, match="refuses"):
        parse('submit "$config" --server "$PORTAL_URL" --wait --timeout soon')
    with pytest.raises(AssertionError, match="unknown shell variable"):
        parse('validate --server "$PORTAL_ULR" x.yaml')
    with pytest.raises(AssertionError, match="fi"):
        assert_shell_syntax("if true; then echo x\n", "a script without fi")


# ---- GitLab --------------------------------------------------------------------------------

def gitlab_scripts(ci: dict) -> str:
    parts = []
    for job in ci.values():
        if isinstance(job, dict):
            for key in ("before_script", "script"):
                parts += job.get(key, [])
    return "\n".join(parts)


def test_gitlab_ci_parses_and_has_the_documented_jobs():
    ci = yaml.safe_load(GITLAB.read_text(encoding="utf-8"))
    assert ci["stages"] == ["validate", "train"]
    validate, train = ci["validate-configs"], ci["train-configs"]
    assert validate["stage"] == "validate" and train["stage"] == "train"
    assert [r["if"] for r in validate["rules"]] == ['$CI_PIPELINE_SOURCE == "merge_request_event"']
    assert [r["if"] for r in train["rules"]] == ['$CI_PIPELINE_SOURCE == "push" && $CI_COMMIT_BRANCH == "main"']
    for job in (validate, train):
        assert all(any(c.startswith("experiments/") for c in r["changes"]) for r in job["rules"])
    assert any("llamaboard-portal validate" in line for line in validate["script"])
    assert any("llamaboard-portal submit" in line and "--wait" in line for line in train["script"])
    # the CLI from the portal's repository, without the training stack
    install = " ".join(ci["default"]["before_script"])
    assert "--no-deps" in install and "$PORTAL_CLI" in install and "httpx" in install
    assert ci["variables"]["PORTAL_CLI"].startswith("git+https://")
    assert "PORTAL_TOKEN" not in ci["variables"], "the token belongs in the project's masked CI/CD variables"


def test_gitlab_ci_command_lines_parse_with_the_real_cli():
    ci = yaml.safe_load(GITLAB.read_text(encoding="utf-8"))
    for name, job in ci.items():
        if isinstance(job, dict) and "script" in job:  # the runner runs before_script and script as one
            assert_shell_syntax("\n".join(ci["default"]["before_script"] + job["script"]), name)
    check_remote_commands(command_lines(gitlab_scripts(ci)), "GitLab")


# ---- Jenkins -------------------------------------------------------------------------------

TOKEN = re.compile(r"""
    (?P<comment>//[^\n]*|/\*.*?\*/)
  | (?P<string>'''.*?'''|\"\"\".*?\"\"\"|'(?:\\.|[^'\\\n])*'|"(?:\\.|[^"\\\n])*")
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<open>[{(\[])
  | (?P<close>[})\]])
  | (?P<space>\s+)
  | (?P<other>.)
""", re.VERBOSE | re.DOTALL)
PAIRS = {"}": "{", ")": "(", "]": "["}


def tokenize(text: str) -> list[tuple[str, str]]:
    """(kind, text) of each token, comments and spaces dropped; an opening quote or comment that
    never closes shows up as an `other` token and fails the checks below."""
    tokens = []
    for match in TOKEN.finditer(text):
        kind = match.lastgroup
        if kind in ("comment", "space"):
            continue
        if kind == "other" and match.group() in "'\"/":
            raise AssertionError(f"unterminated string or comment at offset {match.start()}")
        tokens.append((kind, match.group()))
    return tokens


def string_value(token: str) -> str:
    quote = 3 if token[:3] in ("'''", '"""') else 1
    return token[quote:-quote]


def blocks(tokens: list[tuple[str, str]]) -> dict:
    """The tree of `name [(args)] { ... }` blocks: {"name", "args", "children", "tokens"}."""
    root = {"name": "<file>", "args": [], "children": [], "tokens": []}
    stack, brackets = [root], []
    for i, (kind, text) in enumerate(tokens):
        if kind == "open":
            brackets.append((text, i))
            if text == "{":
                j, args = i - 1, []
                if j >= 0 and tokens[j][1] == ")":  # name(args) {
                    depth = 0
                    while j >= 0:
                        depth += {")": 1, "(": -1}.get(tokens[j][1], 0)
                        if tokens[j][0] == "string":
                            args.insert(0, string_value(tokens[j][1]))
                        if depth == 0:
                            break
                        j -= 1
                    j -= 1
                assert j >= 0 and tokens[j][0] == "word", f"a block without a name before token {i}"
                node = {"name": tokens[j][1], "args": args, "children": [], "tokens": []}
                stack[-1]["children"].append(node)
                stack.append(node)
            continue
        if kind == "close":
            assert brackets and brackets[-1][0] == PAIRS[text], f"unbalanced '{text}' at token {i}"
            brackets.pop()
            if text == "}":
                stack.pop()
            continue
        stack[-1]["tokens"].append((kind, text))
    assert not brackets, f"unclosed '{brackets[-1][0]}'"
    return root


def child(node: dict, name: str) -> dict:
    found = [c for c in node["children"] if c["name"] == name]
    assert len(found) == 1, f"{node['name']} has {len(found)} '{name}' blocks"
    return found[0]


def sh_scripts(node: dict) -> list[str]:
    """The scripts of the `sh '''...'''` steps anywhere under ``node``."""
    scripts, tokens = [], node["tokens"]
    for (kind, text), (next_kind, next_text) in zip(tokens, tokens[1:]):
        if kind == "word" and text == "sh" and next_kind == "string":
            scripts.append(string_value(next_text))
    for c in node["children"]:
        scripts += sh_scripts(c)
    return scripts


def test_the_jenkinsfile_checker_can_fail():
    with pytest.raises(AssertionError, match="unbalanced"):
        blocks(tokenize("pipeline { stages { stage('a') { steps { sh 'x' } } }"[:-1] + ")"))
    with pytest.raises(AssertionError, match="unclosed"):
        blocks(tokenize("pipeline { agent any"))
    with pytest.raises(AssertionError, match="unterminated"):
        tokenize("pipeline { steps { sh '''echo } }")
    # braces inside strings and comments do not count
    tree = blocks(tokenize("pipeline { /* } */ steps { sh 'echo }' // }\n } }"))
    assert sh_scripts(tree) == ["echo }"]


def test_jenkinsfile_is_a_declarative_pipeline():
    tree = blocks(tokenize(JENKINS.read_text(encoding="utf-8")))
    assert [c["name"] for c in tree["children"]] == ["pipeline"] and tree["tokens"] == [("word", "pipeline")]
    pipeline = tree["children"][0]
    child(pipeline, "agent")
    env = child(pipeline, "environment")
    assert ("word", "credentials") in env["tokens"], "the token comes from a Jenkins credential"
    stages = child(pipeline, "stages")
    assert stages["children"] and all(s["name"] == "stage" and len(s["args"]) == 1 for s in stages["children"])
    for stage in stages["children"]:
        child(stage, "steps")
    by_name = {s["args"][0]: s for s in stages["children"]}
    assert ("word", "changeRequest") in child(by_name["Validate changed configs"], "when")["tokens"]
    assert ("string", "'main'") in child(by_name["Train changed configs"], "when")["tokens"]
    for script in sh_scripts(pipeline):
        # Groovy reads backslash escapes even in ''' strings; the shell must get what is written
        assert "\\" not in script, script


def test_jenkinsfile_command_lines_parse_with_the_real_cli():
    tree = blocks(tokenize(JENKINS.read_text(encoding="utf-8")))
    for script in sh_scripts(tree):
        assert_shell_syntax(script, "Jenkinsfile")
    scripts = "\n".join(sh_scripts(tree))
    assert "--no-deps" in scripts and "httpx" in scripts
    check_remote_commands(command_lines(scripts), "Jenkins")
