"""docker-compose.yml cannot run here (no Docker engine); check what can be checked."""

import re
from pathlib import Path

import yaml

from duet_bus.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_compose_file_parses_and_names_its_services():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"kafka", "cloud", "devices"}
    assert compose["services"]["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    for role in ("cloud", "devices"):
        service = compose["services"][role]
        assert service["environment"]["DUET_BOOTSTRAP"] == "kafka:9092"
        assert service["command"].split()[0] == role


def test_compose_commands_are_valid_cli_invocations():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    parser = build_parser()
    for role in ("cloud", "devices"):
        command = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", compose["services"][role]["command"])
        args = parser.parse_args(command.split())
        assert args.command == role and args.checkpoint
