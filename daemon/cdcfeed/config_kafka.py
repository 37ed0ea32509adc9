"""The `[kafka]` settings: where `cdcfeed verify --kafka` (and the daemon's Kafka verifier)
reads Debezium's topics, and how it authenticates. Part of `config.Settings`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import NoDecode


class KafkaSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # NoDecode: CDCFEED_KAFKA__BOOTSTRAP=a:9092,b:9092 is a comma-separated list, not JSON.
    bootstrap: Annotated[list[str], NoDecode] = Field(default_factory=list)
    topic_prefix: str = Field("cdcfeed", min_length=1)
    group: str = Field("cdcfeed-verify", min_length=1)
    due_after: float = Field(300.0, ge=0)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    username: str = ""
    password: SecretStr = SecretStr("")
    cafile: str = ""
    certfile: str = ""
    keyfile: str = ""

    @field_validator("bootstrap", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",")]
        if isinstance(value, list | tuple):
            for address in value:
                if not isinstance(address, str):
                    continue
                host, sep, port = address.rpartition(":")
                if not sep or not host or not port.isdigit() or int(port) > 65535:
                    raise ValueError("expected host:port[,host:port…], e.g. kafka:9092,kafka2:9092")
        return value

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.security_protocol.endswith("SSL")
