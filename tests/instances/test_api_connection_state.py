"""The REST instance list and detail show the last connection.update, as the admin list does."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils.dateparse import parse_datetime

from webhooks.models import ConnectionState

LIST = "/api/v1/instances/"


@pytest.fixture
def api(client, api_key_headers):
    client.defaults.update(api_key_headers)
    return client


def test_the_list_and_detail_show_the_connection_state_and_its_time(api, make_instance):
    acme = make_instance()
    state = ConnectionState.objects.create(instance=acme, state="open")

    item = api.get(LIST).json()["results"][0]
    detail = api.get(f"{LIST}acme/").json()

    for body in (item, detail):
        assert body["connection_state"] == "open"
        assert parse_datetime(body["connection_updated_at"]) == state.updated_at


@pytest.mark.parametrize("state", [None, ""], ids=["no row", "blank state"])
def test_an_instance_without_a_connection_update_shows_null(api, make_instance, state):
    acme = make_instance()
    if state is not None:
        ConnectionState.objects.create(instance=acme, state=state)

    body = api.get(f"{LIST}acme/").json()

    assert (body["connection_state"], body["connection_updated_at"]) == (None, None)


def list_queries(api) -> int:
    with CaptureQueriesContext(connection) as queries:
        assert api.get(LIST).status_code == 200
    return len(queries)


def test_the_list_costs_no_query_per_instance(api, make_instance):
    ConnectionState.objects.create(instance=make_instance(name="a"), state="open")
    one = list_queries(api)
    for name in ("b", "c", "d"):
        ConnectionState.objects.create(instance=make_instance(name=name), state="close")
    make_instance(name="e")

    assert list_queries(api) == one
    assert [item["connection_state"] for item in api.get(LIST).json()["results"]] == [
        "open",
        "close",
        "close",
        "close",
        None,
    ]
