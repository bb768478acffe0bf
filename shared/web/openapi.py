"""The OpenAPI 3.1 document of the HTTP API, generated from the registered endpoints and the
same pydantic models that validate requests, so it always matches what the functions accept."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from shared.web.api import ENDPOINTS, Problem

PROBLEM_STATUS_TEXT = {400: "Bad request", 404: "Not found", 409: "Conflict", 413: "Payload too large",
                       415: "Unsupported media type", 500: "Internal error", 503: "Service unavailable"}


def _schema(annotation: Any, definitions: dict) -> dict:
    schema = TypeAdapter(annotation).json_schema(ref_template="#/components/schemas/{model}", by_alias=True,
                                                 mode="serialization")
    definitions.update(schema.pop("$defs", {}))
    return schema


def _input_schema(annotation: Any, definitions: dict) -> dict:
    schema = TypeAdapter(annotation).json_schema(ref_template="#/components/schemas/{model}", by_alias=True,
                                                 mode="validation")
    definitions.update(schema.pop("$defs", {}))
    return schema


def build_document(version: str = "1.0.0") -> dict:
    definitions: dict = {}
    paths: dict = {}
    for spec in ENDPOINTS:
        operation: dict = {"operationId": spec.name, "summary": spec.summary, "responses": {}}
        parameters = []
        for param, annotation in spec.route_params.items():
            parameters.append({"name": param, "in": "path", "required": True,
                               "schema": _input_schema(annotation, definitions)})
        if spec.query is not None:
            query_schema = _input_schema(spec.query, definitions)
            required = set(query_schema.get("required", []))
            for name, prop in query_schema.get("properties", {}).items():
                parameters.append({"name": name, "in": "query", "required": name in required,
                                   "description": prop.get("description", ""), "schema": prop})
        if parameters:
            operation["parameters"] = parameters
        if spec.body is not None:
            operation["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": _input_schema(spec.body_doc or spec.body, definitions)}}}
        statuses = dict(spec.responses)
        if spec.query is not None or spec.body is not None or spec.route_params:
            statuses.setdefault(400, Problem)
        if spec.body is not None:
            statuses.setdefault(413, Problem)
            statuses.setdefault(415, Problem)
        statuses.setdefault(500, Problem)
        for status, model in sorted(statuses.items()):
            media = "application/problem+json" if model is Problem else "application/json"
            description = PROBLEM_STATUS_TEXT.get(status, "OK" if status < 300 else "Error")
            operation["responses"][str(status)] = {"description": description, "content": {
                media: {"schema": _schema(model, definitions)}}}
        if spec.anonymous:
            operation["security"] = []
        paths.setdefault(f"/api/{spec.route}", {})[spec.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "bookings-invoicing", "version": version,
                 "description": "Microsoft Bookings appointments → Business Central draft sales invoices."},
        "servers": [{"url": "/"}],
        "security": [{"functionKeyHeader": []}, {"functionKeyQuery": []}],
        "paths": paths,
        "components": {
            "schemas": definitions,
            "securitySchemes": {
                "functionKeyHeader": {"type": "apiKey", "in": "header", "name": "x-functions-key"},
                "functionKeyQuery": {"type": "apiKey", "in": "query", "name": "code"},
            },
        },
    }


