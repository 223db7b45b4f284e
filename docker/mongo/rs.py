"""One-member replica set helper of the mongo image (python3-pymongo from Debian).

rs.py init NAME HOST:PORT   wait up to 120 s for mongod, initiate the set if it is not yet,
                            wait until this member is primary.
rs.py health                exit 0 when the local mongod answers and is a writable primary.
"""
import sys
import time

from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError

NOT_YET_INITIALIZED = 94


def client(timeout_ms=2000):
    return MongoClient("127.0.0.1", 27017, directConnection=True,
                       serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms)


def primary(c):
    hello = c.admin.command("isMaster")
    return bool(hello.get("ismaster")) and bool(hello.get("setName"))


def init(name, host):
    deadline = time.time() + 120
    c = client()
    while True:
        try:
            c.admin.command("ping")
            break
        except PyMongoError as e:
            if time.time() > deadline:
                print(f"rs.py: mongod does not answer: {e}", file=sys.stderr)
                return 1
            time.sleep(0.5)
    try:
        c.admin.command("replSetGetStatus")
    except OperationFailure as e:
        if e.code != NOT_YET_INITIALIZED:
            raise
        c.admin.command("replSetInitiate", {"_id": name, "members": [{"_id": 0, "host": host}]})
        print(f"rs.py: replica set {name} initiated with member {host}", file=sys.stderr)
    while not primary(c):
        if time.time() > deadline:
            print("rs.py: this member did not become primary", file=sys.stderr)
            return 1
        time.sleep(0.5)
    return 0


def health():
    try:
        return 0 if primary(client()) else 1
    except PyMongoError as e:
        print(e)
        return 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["init"] and len(sys.argv) == 4:
        sys.exit(init(sys.argv[2], sys.argv[3]))
    if sys.argv[1:] == ["health"]:
        sys.exit(health())
    print(__doc__, file=sys.stderr)
    sys.exit(2)
