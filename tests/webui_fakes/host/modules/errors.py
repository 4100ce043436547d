import traceback

reported: list[str] = []


def report(message: str, *, exc_info: bool = False) -> None:
    reported.append(message + ("\n" + traceback.format_exc() if exc_info else ""))
    print(message)
