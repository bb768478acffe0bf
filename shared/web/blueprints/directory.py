"""Directory triggers: the queue-triggered customer/item upsert and the templates API."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import azure.functions as func
from pydantic import BaseModel, Field

from shared.web.api import ApiRequest, ApiResult, BadRequest, ProblemField, endpoint
from shared.upstream.bc import CustomerFields, ItemFields
from shared.web.blueprints.common import send_later, send_to_poison
from shared.flows.directory.links import KINDS, link_partition, record_failure
from shared.flows.directory.resolver import company_of_source, upsert_from_message
from shared.flows.directory.templates import InvalidTemplate, list_templates, put_template, validate_template
from shared.flows.messages import CustomerBatchUpsert, CustomerUpsert, DirectoryUpsertMessage, directory_upsert, process_message
from shared.runtime import runtime
from shared.storage.store import DIRECTORY_QUEUE

bp = func.Blueprint()

class Template(BaseModel):
    kind: Literal["customer", "item"]
    code: str
    fields: dict[str, Any]
    updated_at: Any = Field(None, alias="updatedAt")


class TemplateList(BaseModel):
    value: list[Template]


CODE = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,19}$", description="Template code, 1–20 characters")


@bp.queue_trigger(arg_name="message", queue_name=DIRECTORY_QUEUE, connection="AzureWebJobsStorage")
async def upsert_directory(message: func.QueueMessage) -> None:
    rt = runtime()

    async def handle(parsed: DirectoryUpsertMessage) -> None:
        await upsert_from_message(rt, parsed)

    async def give_up(parsed: DirectoryUpsertMessage, reason: str) -> None:
        store = await rt.store()
        kind = "customer" if isinstance(parsed, (CustomerUpsert, CustomerBatchUpsert)) else "item"
        for source, _ in parsed.entries():
            partition = link_partition(KINDS[kind], company_of_source(rt, source), rt.settings)
            await record_failure(store, kind, source.email if kind == "customer" else source.service_id, reason,
                                 partition)

    await process_message(message, DIRECTORY_QUEUE, directory_upsert, handle, give_up, send_to_poison, send_later)


@bp.route(route="templates", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
@endpoint("list_templates", "GET", "templates", "List the customer and item templates",
          responses={200: TemplateList})
async def get_templates(request: ApiRequest) -> TemplateList:
    store = await runtime().store()
    return TemplateList(value=[Template.model_validate(t) for t in await list_templates(store)])


@bp.route(route="templates/{kind}/{code}", methods=["PUT"], auth_level=func.AuthLevel.FUNCTION)
@endpoint("put_template", "PUT", "templates/{kind}/{code}",
          "Create or replace a template of BC field defaults for new customers or items",
          body=dict[str, Any], body_doc=Union[CustomerFields, ItemFields],
          route_params={"kind": Literal["customer", "item"], "code": Annotated[str, CODE]},
          responses={200: Template})
async def put_template_route(request: ApiRequest) -> ApiResult:
    kind, code = request.route["kind"], request.route["code"]
    try:
        fields = validate_template(kind, request.body)
    except InvalidTemplate as error:
        raise BadRequest(str(error), [ProblemField(field=name, message=message)
                                      for name, message in error.problems]) from None
    store = await runtime().store()
    saved = await put_template(store, kind, code, fields)
    return ApiResult(Template.model_validate(saved))
