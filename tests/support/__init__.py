"""What the tests share: the toy task (the shortest complete task, `task: support.toy_task`), a stand-in FID
detector, the small official-format VAR files and their golden outputs, and the scripts tests run as processes
(engine checks under torchrun, a writer or trainer killed at a chosen point, a fake eval job)."""
