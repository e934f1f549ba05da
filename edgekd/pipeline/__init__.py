"""``compress()``: profile -> plan -> stages -> report, in a resumable run directory.

``plan`` decides the stages and the files from the profile; ``context`` holds what stages hand
each other; ``rundir`` owns the directory and the stage state; ``run`` drives it all.
"""
