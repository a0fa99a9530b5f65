# Runs after boot.py. start.py decides between safe mode and the app (and is unloaded before the
# app runs: every byte of heap counts); an exception from the app is logged by start.py, then
# the board resets. Ctrl-C drops to the REPL, where the app's watchdog resets the board a few
# seconds later: for a REPL session, ground the safe-mode pin and reset.


def main():
    import gc
    import sys

    import machine
    import start

    box = start.config()
    del start
    sys.modules.pop("start")
    gc.collect()
    if box is None:
        return  # safe mode: the reasons are on the console
    try:
        import app

        app.run(box)
    except Exception as e:  # whatever the app did not handle
        try:
            import start

            start.log_crash(e)
        finally:
            machine.reset()


main()
