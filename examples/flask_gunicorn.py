"""A Flask shop under gunicorn where every request is a transaction (forkpoint.wsgi.protect).

Run it from the repository root (pip install flask gunicorn; forkpoint installed):

    gunicorn --chdir examples flask_gunicorn:app

and try it:

    curl localhost:8000/stock                        # {"apples": 10, "pears": 4}
    curl -X POST localhost:8000/sell/apples/3        # {"apples": 7, "pears": 4}
    curl -X POST 'localhost:8000/sell/pears/1?gift_wrap=glitter'
        # the gift-wrap renderer (C code) segfaults halfway through the sale: the client gets a 500,
        # the pear taken off the shelf is back, the worker and everything it loaded are still there
    curl localhost:8000/stock                        # {"apples": 7, "pears": 4}: nothing half-done
    # the same poisoned request twice more: the first is a 500 again, then a 503 (quarantined)

Use transaction mode when a request changes in-memory state that must stay consistent: every change
a failed request made is undone, at the price of a fork per request (about 1 ms; a handler doing
1 ms of work keeps about half its throughput). Under gunicorn, each worker is its own forkpoint
program; gunicorn's command line does not change, with any --workers.
"""
from __future__ import annotations

import ctypes
import os

from flask import Flask, jsonify, request

import forkpoint.wsgi

shop = Flask(__name__)
# Flask answers a view's exception with a 500 of its own, and the transaction would commit what the
# view changed before it raised: let exceptions escape, so that forkpoint undoes them too.
shop.config["PROPAGATE_EXCEPTIONS"] = True
stock = {"apples": 10, "pears": 4}       # the worker's in-memory state


def render_gift_wrap(style: str) -> None:
    """Stands for a native library with a bug: one input makes it dereference NULL."""
    if style == "glitter":
        ctypes.string_at(0)


@shop.get("/stock")
def show_stock():
    return jsonify(stock)


@shop.post("/sell/<item>/<int:count>")
def sell(item: str, count: int):
    if stock.get(item, 0) < count:
        return jsonify(error=f"only {stock.get(item, 0)} {item} left"), 409
    stock[item] -= count                 # taken off the shelf...
    render_gift_wrap(request.args.get("gift_wrap", "plain"))   # ...and the process dies here
    return jsonify(stock)


@shop.get("/pid")
def pid():
    return jsonify(pid=os.getpid())


app = forkpoint.wsgi.protect(shop, mode="transaction", timeout=5.0)
