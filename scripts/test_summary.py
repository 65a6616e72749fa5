"""Sum the JUnit files of a test run: one line per run, then the totals.
A test counts as failed if it failed on any rank."""
import glob
import os
import sys
import xml.etree.ElementTree as ET


def outcomes(path):
    res = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            res[name] = "failed"
        elif case.find("skipped") is not None:
            res[name] = "skipped"
        else:
            res[name] = "passed"
    return res


def main(logdir):
    runs = {}
    for path in sorted(glob.glob(os.path.join(logdir, "*.xml"))):
        run = os.path.basename(path).split("-rank")[0].removesuffix(".xml")
        res = runs.setdefault(run, {})
        for name, out in outcomes(path).items():
            # failed on any rank > passed on some rank > skipped everywhere
            rank_of = {"skipped": 0, "passed": 1, "failed": 2}
            if rank_of[out] >= rank_of.get(res.get(name, "skipped"), 0):
                res[name] = out
    total = {"passed": 0, "failed": 0, "skipped": 0}
    for run, res in runs.items():
        c = {k: sum(1 for v in res.values() if v == k) for k in total}
        for k in total:
            total[k] += c[k]
        print(f"{run}: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped")
    print(f"{total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped")
    return 1 if total["failed"] or not runs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ".test-logs"))
