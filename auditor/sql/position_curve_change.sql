-- Largest relative change of the examination curve in the last fit step (convergence check).
SELECT coalesce(max(abs(n.examination - p.examination) / greatest(p.examination, 1e-9)), 0)
FROM audit_examination n JOIN audit_examination_previous p USING (position)
