"""Malformed policies and configs fail at load time with a message that names the problem and fix."""

from __future__ import annotations

import pytest

from corral import ConfigError, EgressPolicy, EgressRule, PolicyError, SandboxConfig
from corral.net.policy import decide


@pytest.mark.parametrize(
    "text,domain,cidr,ports",
    [
        ("pypi.org", "pypi.org", None, None),
        ("*.example.com:443", "*.example.com", None, (443, 443)),
        ("198.51.100.0/24", None, "198.51.100.0/24", None),
        ("203.0.113.7:22", None, "203.0.113.7/32", (22, 22)),
        ("host.example.com:8000-8100", "host.example.com", None, (8000, 8100)),
        ("[2001:db8::/32]:443", None, "2001:db8::/32", (443, 443)),
        ("PyPI.ORG.", "pypi.org", None, None),
    ],
)
def test_rule_parsing(text, domain, cidr, ports):
    r = EgressRule.parse(text)
    assert (r.domain, r.cidr, r.ports) == (domain, cidr, ports)


@pytest.mark.parametrize(
    "text,needle",
    [
        ("", "empty egress rule"),
        ("bad rule!!", "neither a domain"),
        ("example.com:http", "is not a number"),
        ("example.com:70000", "1-65535"),
        ("example.com:90-80", "low <= high"),
        ("[2001:db8::/32", "unclosed"),
        ("*.*.com", "neither a domain"),
    ],
)
def test_bad_rules_name_the_problem(text, needle):
    with pytest.raises(PolicyError, match=r"egress rule|empty") as e:
        EgressRule.parse(text)
    assert needle in str(e.value)


def test_policy_file_errors_name_file_and_line(tmp_path):
    f = tmp_path / "policy.yaml"
    f.write_text("egress:\n  allow:\n    - pypi.org\n    - [unclosed\n")
    with pytest.raises(ConfigError, match=r"policy.yaml: line \d+"):
        EgressPolicy.from_file(f)
    f.write_text("egress:\n  allow: ['pypi.org', 'not a rule!']\n")
    with pytest.raises(ConfigError, match="not a rule!"):
        EgressPolicy.from_file(f)
    f.write_text("egress:\n  allow: ['pypi.org']\n  allwo: []\n")
    with pytest.raises(ConfigError, match="allwo"):
        EgressPolicy.from_file(f)
    f.write_text("egress:\n  allow: ['pypi.org:443', '*.pythonhosted.org']\n")
    p = EgressPolicy.from_file(f)
    assert [str(r) for r in p.allow] == ["pypi.org:443", "*.pythonhosted.org"]
    with pytest.raises(ConfigError, match="cannot read"):
        EgressPolicy.from_file(tmp_path / "missing.yaml")


def test_sandbox_config_file_errors(tmp_path):
    f = tmp_path / "sb.yaml"
    f.write_text("limits:\n  memory_mb: 4\n  pids: lots\n")
    with pytest.raises(ConfigError) as e:
        SandboxConfig.from_file(f)
    assert "limits.memory_mb" in str(e.value) and "limits.pids" in str(e.value)
    f.write_text("limits:\n  memory_mb: 256\negress:\n  allow: [pypi.org]\nenv: {A: '1'}\n")
    cfg = SandboxConfig.from_file(f)
    assert cfg.limits.memory_mb == 256 and cfg.env == (("A", "1"),)
    assert hash(cfg) == hash(SandboxConfig.from_file(f))  # equal configs share a warm pool


def test_policy_decisions():
    p = EgressPolicy.allowing("pkg.example.com:80", "*.cdn.example.net", "10.1.0.0/16:5432")
    assert decide(p, "198.51.100.10", 80, {"pkg.example.com"}).allow
    assert not decide(p, "198.51.100.10", 443, {"pkg.example.com"}).allow
    assert not decide(p, "198.51.100.10", 80, set()).allow
    assert decide(p, "203.0.113.9", 443, {"a.cdn.example.net"}).allow
    assert not decide(p, "203.0.113.9", 443, {"a.cdn.example.net"}, claimed_name="evil.example.com").allow
    assert decide(p, "10.1.2.3", 5432).allow
    assert not decide(p, "10.1.2.3", 22).allow
    assert not decide(p, "169.254.169.254", 80, {"a.cdn.example.net"}).allow
    assert not decide(p, "192.168.1.1", 80, {"pkg.example.com"}).allow
    assert not decide(p, "127.0.0.1", 80).allow
    assert not decide(p, "198.51.100.99", 80, {"pkg.example.com"}, host_addresses=frozenset({"198.51.100.99"})).allow
    assert not decide(EgressPolicy(), "198.51.100.10", 80).allow
